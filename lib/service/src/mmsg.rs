//! Batches of UDP datagrams, one system call each way: `recvmmsg` reads what has queued up on a socket, `sendmmsg`
//! writes datagrams to many destinations. Both never block (`MSG_DONTWAIT`): callers go through their runtime's
//! readiness (`try_io`) and wait when told `WouldBlock`.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::AsRawFd,
};

use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

/// Datagrams read or written per system call.
pub const BATCH: usize = 64;

/// One non-blocking `recvmmsg` into `slots`; each datagram's length (cut at `SLOT`, so a longer one reads as
/// exactly `SLOT` bytes) and source go to `received`. How many were read.
pub fn receive<const SLOT: usize>(
    socket: &impl AsRawFd,
    slots: &mut [[u8; SLOT]; BATCH],
    received: &mut [(usize, Option<SocketAddr>); BATCH],
) -> io::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut iovs = slots.each_mut().map(|slot| [IoSliceMut::new(slot)]);
    let results = recvmmsg(socket.as_raw_fd(), &mut headers, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
    let mut count = 0;
    for (entry, message) in received.iter_mut().zip(results) {
        *entry = (message.bytes.min(SLOT), message.address.as_ref().and_then(std_addr));
        count += 1;
    }
    Ok(count)
}

/// One non-blocking `sendmmsg` of up to [`BATCH`] datagrams, each to its destination; how many the kernel took.
/// It fails only when the first one does.
pub fn send(socket: &impl AsRawFd, datagrams: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let count = datagrams.len().min(BATCH);
    let iovs: [[IoSlice<'_>; 1]; BATCH] =
        std::array::from_fn(|i| [IoSlice::new(datagrams.get(i).map_or(&[][..], |(_, bytes)| bytes))]);
    let addrs: [Option<SockaddrStorage>; BATCH] =
        std::array::from_fn(|i| datagrams.get(i).map(|(dest, _)| SockaddrStorage::from(*dest)));
    let no_control: [ControlMessage<'_>; 0] = [];
    let results =
        sendmmsg(socket.as_raw_fd(), &mut headers, iovs[..count].iter(), addrs, no_control, MsgFlags::MSG_DONTWAIT)?;
    Ok(results.count())
}

/// Sends `datagrams` from index `*done` on, [`BATCH`] per `sendmmsg`, moving `*done` past what the kernel took.
/// `Ok` once all are sent; `WouldBlock` when the socket's buffer is full (wait, then call again). A datagram the
/// kernel refuses (`sendmmsg` fails only when its first one does) is logged and skipped.
pub fn send_from(socket: &impl AsRawFd, datagrams: &[(SocketAddr, &[u8])], done: &mut usize) -> io::Result<()> {
    while *done < datagrams.len() {
        let chunk = &datagrams[*done..datagrams.len().min(*done + BATCH)];
        match send(socket, chunk) {
            Ok(sent) => *done += sent.max(1),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Err(error),
            Err(error) => {
                tracing::debug!(%error, dest = %chunk[0].0, "datagram not sent");
                *done += 1;
            }
        }
    }
    Ok(())
}

fn std_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    storage.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_with_sources_and_cut_lengths() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = server.local_addr().expect("addr");
        let long = [7_u8; 40];
        let sent = send(&client, &[(to, b"one"), (to, &long[..]), (other.local_addr().expect("addr"), b"x")]);
        assert_eq!(sent.expect("sent"), 3);
        let mut slots = Box::new([[0_u8; 16]; BATCH]);
        let mut received = [(0, None); BATCH];
        let mut count = 0;
        for _ in 0..100 {
            count = receive(&server, &mut slots, &mut received).unwrap_or(0);
            if count == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(count, 2);
        let from = Some(client.local_addr().expect("addr"));
        assert_eq!(received[0], (3, from));
        assert_eq!(&slots[0][..3], b"one");
        assert_eq!(received[1], (16, from), "cut at the slot");
        let empty = receive(&server, &mut slots, &mut received);
        assert_eq!(empty.map_err(|error| error.kind()), Err(io::ErrorKind::WouldBlock));
    }

    /// `send_from` sends more than a batch in several calls, and skips a datagram the kernel refuses (one too long
    /// for UDP) without losing the ones after it.
    #[test]
    fn send_from_crosses_batches_and_skips_a_refused_datagram() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        server.set_nonblocking(true).expect("non-blocking");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = server.local_addr().expect("addr");
        let too_long = vec![0_u8; 70_000];
        let payloads: Vec<[u8; 2]> = (0..BATCH as u16 + 10).map(u16::to_be_bytes).collect();
        let mut datagrams: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, &p[..])).collect();
        datagrams.insert(3, (to, &too_long[..]));
        let mut done = 0;
        send_from(&client, &datagrams, &mut done).expect("all sent");
        assert_eq!(done, datagrams.len());
        let mut slots = Box::new([[0_u8; 16]; BATCH]);
        let mut received = [(0, None); BATCH];
        let mut got = Vec::new();
        for _ in 0..100 {
            match receive(&server, &mut slots, &mut received) {
                Ok(count) => got.extend(slots[..count].iter().zip(&received).map(|(s, r)| (s[0], s[1], r.0))),
                Err(_) if got.len() == payloads.len() => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        let want: Vec<(u8, u8, usize)> = payloads.iter().map(|p| (p[0], p[1], 2)).collect();
        assert_eq!(got, want);
    }
}
