//! One direction of a TCP flow moved with splice(2), socket → pipe → socket, so its bytes never enter user space.
//!
//! nix's safe wrappers (`pipe2`, `splice`, `fcntl`) do the system calls; tokio's readiness drives them, each call
//! inside `try_io`, so an EAGAIN clears the readiness of the socket it concerns. Bytes in the pipe are always
//! written out before the socket is read again: a splice into the pipe then finds it empty, so its EAGAIN can only
//! mean the socket has nothing, and a slow writer stalls the reader (backpressure, at most one pipe per direction).
//!
//! A direction holds a pipe only while bytes are in it: it borrows an empty one from [`Pipes`] when its socket
//! turns readable and gives it back once drained. Idle flows hold none, so they cost no descriptors beyond their
//! sockets and nothing of the user's pipe quota, and short flows skip creating pipes.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream};

/// Empty pipes of one size, lent to the directions that have bytes to move.
#[derive(Debug)]
pub struct Pipes {
    size: usize,
    idle: Mutex<Vec<Pipe>>,
}

/// A kernel pipe carrying one direction of a flow.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

/// When a flow last moved a byte either way, for its idle timeout: a clock of its own, touched with every chunk.
#[derive(Debug)]
pub struct Activity {
    start: std::time::Instant,
    /// Milliseconds from `start` to the last chunk moved.
    last: std::sync::atomic::AtomicU64,
}

impl Activity {
    /// A flow starting now.
    pub fn new() -> Self {
        Self { start: std::time::Instant::now(), last: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Bytes moved now.
    pub fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time since bytes last moved (or since the start).
    pub fn idle(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last.load(std::sync::atomic::Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once no byte moved for `limit`.
    pub async fn idle_for(&self, limit: std::time::Duration) {
        loop {
            let idle = self.idle();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Where one direction counts what it moved: the domain's byte counter and the flow's activity.
#[derive(Debug, Clone, Copy)]
pub struct Tally<'a> {
    /// Bytes, by domain and direction.
    pub bytes: &'a Counter,
    /// The flow's last movement.
    pub activity: &'a Activity,
}

impl Tally<'_> {
    /// `n` bytes moved.
    pub fn add(&self, n: usize) {
        self.bytes.inc_by(n as u64);
        self.activity.touch();
    }
}

/// How [`forward`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spliced {
    /// The reader's EOF: everything before it was written out.
    Eof,
    /// The kernel cannot splice these sockets (EINVAL, ENOSYS); nothing was moved.
    Unsupported,
}

impl Pipes {
    /// No pipes yet; those made will hold about `size` bytes.
    pub fn new(size: usize) -> Self {
        Self { size, idle: Mutex::new(Vec::new()) }
    }

    /// Pipes idle in the pool.
    pub fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }

    /// An empty pipe: an idle one, or a new one.
    fn take(&self) -> io::Result<Pipe> {
        match self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(self.size),
        }
    }

    /// Takes back an empty pipe, or closes it when enough are idle.
    fn give(&self, pipe: Pipe) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(pipe);
        }
    }
}

impl Pipe {
    /// A non-blocking pipe holding about `size` bytes. The kernel rounds the size up to a power of two pages, and
    /// keeps its default (64 KiB, less past the user's pipe quota) when it refuses the size.
    pub fn new(size: usize) -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let wanted = i32::try_from(size).unwrap_or(i32::MAX);
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(DEFAULT_PIPE, |bytes| usize::try_from(bytes).unwrap_or(DEFAULT_PIPE));
        Ok(Self { read, write, size })
    }

    /// Bytes the pipe holds.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// Whether an error means splice(2) or pipes are not available here, rather than that this flow failed.
pub fn unsupported(error: &io::Error) -> bool {
    matches!(error.raw_os_error().map(Errno::from_raw), Some(Errno::EINVAL | Errno::ENOSYS))
}

/// Moves bytes from `from` to `to` through pipes borrowed from `pipes` until `from`'s EOF, counting them in
/// `counter` as they reach `to`. The caller half-closes `to` afterwards.
pub async fn forward(from: &TcpStream, to: &TcpStream, pipes: &Pipes, tally: Tally<'_>) -> io::Result<Spliced> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved_any = false;
    loop {
        from.readable().await?;
        let pipe = match pipes.take() {
            Ok(pipe) => pipe,
            Err(error) if !moved_any && unsupported(&error) => return Ok(Spliced::Unsupported),
            Err(error) => return Err(error),
        };
        // The pipe is empty: fill it from the socket.
        let filled = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.write.as_fd(), None, pipe.size, flags).map_err(io::Error::from)
        });
        let mut in_pipe = match filled {
            Ok(0) => {
                pipes.give(pipe);
                return Ok(Spliced::Eof);
            }
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                pipes.give(pipe);
                continue;
            }
            Err(error) if !moved_any && unsupported(&error) => return Ok(Spliced::Unsupported),
            Err(error) => return Err(error),
        };
        moved_any = true;
        // Then drain it to the other socket before reading more.
        while in_pipe > 0 {
            to.writable().await?;
            let drained = to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, in_pipe, flags).map_err(io::Error::from)
            });
            match drained {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    in_pipe -= n;
                    tally.add(n);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                // A pipe dropped with bytes in it is closed, never lent again.
                Err(error) => return Err(error),
            }
        }
        pipes.give(pipe);
    }
}

/// Linux's default pipe size.
const DEFAULT_PIPE: usize = 64 << 10;
/// Most pipes kept idle; more are closed when given back.
const MAX_IDLE: usize = 64;

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    async fn connected() -> io::Result<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let near = TcpStream::connect(listener.local_addr()?).await?;
        let (far, _) = listener.accept().await?;
        Ok((near, far))
    }

    #[tokio::test]
    async fn bytes_go_through_a_small_pipe_to_a_slow_reader_and_stop_at_eof() -> io::Result<()> {
        let (mut client, from) = connected().await?;
        let (to, mut server) = connected().await?;
        // One page: many fills and drains, and the reader's pauses fill the socket buffers (EAGAIN on the writer).
        assert_eq!(Pipe::new(4096)?.size(), 4096);
        let pipes = Pipes::new(4096);
        let data: Vec<u8> = (0..8_u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
        let counter = Counter::default();
        let send = async {
            client.write_all(&data).await?;
            client.shutdown().await
        };
        let receive = async {
            let mut got = Vec::with_capacity(data.len());
            let mut buf = vec![0_u8; 256 << 10];
            for reads in 0_u64.. {
                let n = server.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if reads % 8 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            io::Result::Ok(got)
        };
        let relay = async {
            let activity = Activity::new();
            let spliced = forward(&from, &to, &pipes, Tally { bytes: &counter, activity: &activity }).await?;
            // As the relay does on EOF: half-close the writer, so the reader sees the end.
            nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&to), nix::sys::socket::Shutdown::Write)?;
            io::Result::Ok(spliced)
        };
        let ((), got, spliced) = tokio::try_join!(send, receive, relay)?;
        assert_eq!(spliced, Spliced::Eof);
        // The one pipe went back to the pool, empty, each time the bytes in it were written out.
        assert_eq!(pipes.idle(), 1);
        assert_eq!(counter.get(), data.len() as u64);
        assert!(got == data, "{} bytes arrived, changed or in part", got.len());
        Ok(())
    }

    #[test]
    fn only_missing_support_is_unsupported() {
        assert!(unsupported(&io::Error::from_raw_os_error(Errno::EINVAL as i32)));
        assert!(unsupported(&io::Error::from_raw_os_error(Errno::ENOSYS as i32)));
        assert!(!unsupported(&io::Error::from_raw_os_error(Errno::ECONNRESET as i32)));
        assert!(!unsupported(&io::Error::from_raw_os_error(Errno::EMFILE as i32)));
    }
}
