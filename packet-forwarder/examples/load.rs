//! The load tool of `bench/forwarder`: a TCP echo server, a TCP connect+echo client (connections per second and
//! latency), and a UDP blaster and sink (packets per second). Every mode ends on its own after `--seconds`.
//!
//! ```text
//! load echo  --listen ADDR [--threads N] --seconds S
//! load tcp   --to ADDR [--workers K] [--count N] --seconds S
//! load sink  --listen ADDR --seconds S
//! load blast --to ADDR [--size BYTES] [--flows F] --seconds S
//! ```
//!
//! Results are one line of `key=value` pairs on stdout. The blaster sends 64-datagram bursts with UDP GSO (one
//! system call per burst), so the generator is rarely what limits a relay; the sink reads with recvmmsg.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmsg};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!("usage: load echo|tcp|sink|blast --option value ...");
        return ExitCode::from(2);
    };
    let options = match Options::parse(rest) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("load: {error}");
            return ExitCode::from(2);
        }
    };
    // Bounded whatever happens: the whole process ends one second after its time is up.
    let limit = Duration::from_secs_f64(options.seconds + 1.0);
    thread::spawn(move || {
        thread::sleep(limit);
        eprintln!("load: time limit reached");
        std::process::exit(3);
    });
    let result = match mode.as_str() {
        "echo" => echo(&options),
        "tcp" => tcp(&options),
        "sink" => sink(&options),
        "blast" => blast(&options),
        other => Err(format!("unknown mode {other}").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("load {mode}: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    values: HashMap<String, String>,
    seconds: f64,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut values = HashMap::new();
        for pair in args.chunks(2) {
            let [key, value] = pair else { return Err(format!("{} needs a value", pair[0]).into()) };
            let Some(key) = key.strip_prefix("--") else { return Err(format!("unexpected {key}").into()) };
            values.insert(key.to_owned(), value.clone());
        }
        let seconds = values.get("seconds").ok_or("--seconds is required")?.parse()?;
        Ok(Self { values, seconds })
    }

    fn addr(&self, key: &str) -> Result<SocketAddr> {
        Ok(self.values.get(key).ok_or_else(|| format!("--{key} is required"))?.parse()?)
    }

    fn number(&self, key: &str, default: u64) -> Result<u64> {
        self.values.get(key).map_or(Ok(default), |v| Ok(v.parse()?))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs_f64(self.seconds)
    }
}

/// TCP echo: each thread accepts and serves one connection at a time, echoes, and closes once the client has.
fn echo(options: &Options) -> Result<()> {
    let listener = TcpListener::bind(options.addr("listen")?)?;
    let threads = options.number("threads", 16)?;
    let mut handles = Vec::new();
    for _ in 0..threads {
        let listener = listener.try_clone()?;
        handles.push(thread::spawn(move || {
            let mut buf = [0_u8; 64 << 10];
            while let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.set_nodelay(true);
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }));
    }
    thread::sleep(Duration::from_secs_f64(options.seconds));
    Ok(())
}

/// TCP clients: each worker connects, sends one byte, waits for the echo (timed), half-closes, waits for the
/// server's close, and starts over, until `--count` connections in all or `--seconds`.
fn tcp(options: &Options) -> Result<()> {
    let to = options.addr("to")?;
    let workers = options.number("workers", 1)?;
    let count = options.number("count", u64::MAX)?;
    let deadline = options.deadline();
    let started = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let begin = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (started, errors) = (started.clone(), errors.clone());
        handles.push(thread::spawn(move || {
            let mut samples = Vec::new();
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < count {
                match one_connection(to) {
                    Ok(rtt) => samples.push(rtt),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            samples
        }));
    }
    let mut samples: Vec<Duration> = Vec::new();
    for handle in handles {
        samples.extend(handle.join().map_err(|_| "worker panicked")?);
    }
    let elapsed = begin.elapsed().as_secs_f64();
    samples.sort_unstable();
    let quantile = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "connections={} errors={} seconds={elapsed:.2} cps={:.0} p50_us={:.0} p99_us={:.0}",
        samples.len(),
        errors.load(Ordering::Relaxed),
        samples.len() as f64 / elapsed,
        quantile(0.5),
        quantile(0.99),
    );
    Ok(())
}

fn one_connection(to: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"x")?;
    let mut byte = [0_u8; 1];
    stream.read_exact(&mut byte)?;
    let rtt = start.elapsed();
    stream.shutdown(Shutdown::Write)?;
    // The echo server closes after our half-close; reading its EOF keeps TIME_WAIT off the client's ports.
    let _ = stream.read(&mut byte);
    Ok(rtt)
}

/// Per burst, the datagrams a blaster sends with one GSO system call.
const BURST: usize = 64;

/// UDP sink: counts datagrams (recvmmsg, 64 at a time) and checks each flow's sequence numbers; reports the rate
/// between the first and the last datagram once the senders have been quiet for 300 ms.
fn sink(options: &Options) -> Result<()> {
    let socket = UdpSocket::bind(options.addr("listen")?)?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let deadline = options.deadline();
    let mut bufs = vec![[0_u8; 2048]; BURST];
    let (mut received, mut bytes, mut reordered) = (0_u64, 0_u64, 0_u64);
    let mut next: HashMap<u32, u64> = HashMap::new();
    let (mut first, mut last) = (None, Instant::now());
    while Instant::now() < deadline {
        let batch = {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BURST, None);
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
            recvmmsg(socket.as_raw_fd(), &mut headers, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None)
                .map(|results| results.map(|m| m.bytes).collect::<Vec<usize>>())
        };
        let lens = match batch {
            Ok(lens) => lens,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) if first.is_some() => break,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
        };
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        for (buf, &len) in bufs.iter().zip(&lens) {
            received += 1;
            bytes += len as u64;
            if len >= 12 {
                let flow = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let seq = u64::from_le_bytes([buf[4], buf[5], buf[6], buf[7], buf[8], buf[9], buf[10], buf[11]]);
                let expected = next.entry(flow).or_insert(0);
                if seq < *expected {
                    reordered += 1;
                } else {
                    *expected = seq + 1;
                }
            }
        }
    }
    let elapsed = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    let pps = if elapsed > 0.0 { received as f64 / elapsed } else { 0.0 };
    println!(
        "received={received} bytes={bytes} reordered={reordered} flows={} seconds={elapsed:.2} pps={pps:.0} \
         mbit={:.0}",
        next.len(),
        bytes as f64 * 8.0 / elapsed.max(1e-9) / 1e6
    );
    Ok(())
}

/// UDP blaster: `--flows` sockets (one thread each) connected to `--to`, each sending bursts of `BURST` datagrams
/// of `--size` bytes (flow id, sequence number, padding) in one GSO call, as fast as the kernel takes them.
fn blast(options: &Options) -> Result<()> {
    let to = options.addr("to")?;
    let size = usize::try_from(options.number("size", 64)?)?.clamp(12, 1400);
    let flows = options.number("flows", 1)?;
    let deadline = options.deadline();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for flow in 0..flows {
        let stop = stop.clone();
        handles.push(thread::spawn(move || -> Result<(u64, u64)> {
            let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
            let socket = UdpSocket::bind(any)?;
            socket.connect(to)?;
            let mut burst = vec![0_u8; size * BURST];
            let segment = u16::try_from(size)?;
            let (mut seq, mut errors) = (0_u64, 0_u64);
            while !stop.load(Ordering::Relaxed) {
                for (i, datagram) in burst.chunks_mut(size).enumerate() {
                    datagram[..4].copy_from_slice(&u32::try_from(flow)?.to_le_bytes());
                    datagram[4..12].copy_from_slice(&(seq + i as u64).to_le_bytes());
                }
                let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
                match sendmsg::<SockaddrStorage>(
                    socket.as_raw_fd(),
                    &[IoSlice::new(&burst)],
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                ) {
                    Ok(_) => seq += BURST as u64,
                    // ECONNREFUSED: the relay is not there yet (ICMP); the next burst goes anyway.
                    Err(_) => errors += 1,
                }
            }
            Ok((seq, errors))
        }));
    }
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut errors) = (0, 0);
    for handle in handles {
        let (s, e) = handle.join().map_err(|_| "sender panicked")??;
        sent += s;
        errors += e;
    }
    println!("sent={sent} errors={errors} seconds={:.2} pps={:.0}", options.seconds, sent as f64 / options.seconds);
    Ok(())
}
