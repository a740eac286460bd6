//! Datagrams in batches: recvmmsg(2) and sendmmsg(2) on tokio's UDP sockets through nix's safe wrappers, so a
//! burst costs one system call each way rather than one per datagram.
//!
//! [`Slots`] is one buffer cut into equal slots, each receiving one datagram a fixed `headroom` into the slot, so a
//! header can be written in front of a datagram without moving it. nix's header arrays hold raw pointers (not
//! `Send`), so they live only inside the synchronous closure of one system call.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    ops::Range,
    os::fd::AsRawFd,
};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio::{io::Interest, net::UdpSocket};

/// Most datagrams one system call receives or sends.
pub const BATCH: usize = 32;

/// One datagram of the last [`Slots::recv`]: its slot, length and sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Index of its slot.
    pub slot: usize,
    /// Bytes received.
    pub len: usize,
    /// The sender (for a connected socket, its peer).
    pub from: Option<SocketAddr>,
}

/// Receive buffers for up to [`BATCH`] datagrams of up to `capacity` bytes each.
#[derive(Debug)]
pub struct Slots {
    buf: Vec<u8>,
    headroom: usize,
    size: usize,
    count: usize,
}

impl Slots {
    /// `count` slots (at most [`BATCH`]) for datagrams of up to `capacity` bytes behind `headroom` free bytes.
    pub fn new(count: usize, headroom: usize, capacity: usize) -> Self {
        let size = headroom + capacity;
        let count = count.clamp(1, BATCH);
        // Zeroed pages are mapped lazily: slots cost memory only as far as datagrams fill them.
        Self { buf: vec![0; size * count], headroom, size, count }
    }

    /// Slots in use.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Grows to `count` slots (at most [`BATCH`]).
    pub fn grow(&mut self, count: usize) {
        let count = count.min(BATCH);
        if count > self.count {
            self.buf.resize(self.size * count, 0);
            self.count = count;
        }
    }

    /// Waits for datagrams and receives as many as are queued, up to the slot count, into `got` (cleared first).
    pub async fn recv(&mut self, socket: &UdpSocket, got: &mut Vec<Datagram>) -> io::Result<()> {
        loop {
            socket.readable().await?;
            match socket.try_io(Interest::READABLE, || self.recv_now(socket, got)) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return result,
            }
        }
    }

    fn recv_now(&mut self, socket: &UdpSocket, got: &mut Vec<Datagram>) -> io::Result<()> {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(self.count, None);
        let (headroom, size) = (self.headroom, self.size);
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            self.buf.chunks_exact_mut(size).map(|slot| [IoSliceMut::new(&mut slot[headroom..])]).collect();
        let received = recvmmsg(socket.as_raw_fd(), &mut headers, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
        got.clear();
        for (slot, message) in received.enumerate() {
            got.push(Datagram { slot, len: message.bytes, from: message.address.and_then(std_addr) });
        }
        Ok(())
    }

    /// The bytes of a received datagram.
    pub fn datagram(&self, datagram: &Datagram) -> &[u8] {
        &self.buf[self.range(datagram, 0)]
    }

    /// Writes `header` in front of a received datagram and returns the range of both, or `None` when the header
    /// does not fit in the headroom.
    pub fn prepend(&mut self, datagram: &Datagram, header: &[u8]) -> Option<Range<usize>> {
        if header.len() > self.headroom {
            return None;
        }
        let range = self.range(datagram, header.len());
        self.buf[range.start..range.start + header.len()].copy_from_slice(header);
        Some(range)
    }

    /// The range of a datagram in the buffer, with `front` bytes of headroom before it.
    pub fn range(&self, datagram: &Datagram, front: usize) -> Range<usize> {
        let start = datagram.slot * self.size + self.headroom;
        start - front..start + datagram.len
    }

    /// The whole buffer, which the ranges index.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// What became of a [`send`]: datagrams sent and, for those the kernel refused, how many and the last error.
#[derive(Debug, Default)]
pub struct Sent {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams refused (each is dropped, as a lone `send` would drop it).
    pub failed: usize,
    /// The last refusal.
    pub error: Option<io::Error>,
}

/// Sends the datagrams at `ranges` of `buf`, in order, to `to` (`None`: the connected peer); waits while the socket
/// is full. A datagram the kernel refuses is counted and skipped, so one bad datagram does not hold back the rest.
pub async fn send(socket: &UdpSocket, to: Option<SocketAddr>, buf: &[u8], ranges: &[Range<usize>]) -> Sent {
    let mut outcome = Sent::default();
    let mut next = 0;
    let to = to.map(SockaddrStorage::from);
    while next < ranges.len() {
        if let Err(error) = socket.writable().await {
            outcome.failed += ranges.len() - next;
            outcome.error = Some(error);
            break;
        }
        match socket.try_io(Interest::WRITABLE, || send_now(socket, to, buf, &ranges[next..])) {
            Ok(n) => {
                outcome.sent += n;
                next += n.max(1);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => {
                outcome.failed += 1;
                outcome.error = Some(error);
                next += 1;
            }
        }
    }
    outcome
}

fn send_now(socket: &UdpSocket, to: Option<SockaddrStorage>, buf: &[u8], ranges: &[Range<usize>]) -> io::Result<usize> {
    let count = ranges.len().min(BATCH);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(count, None);
    let iovs: Vec<[IoSlice<'_>; 1]> = ranges[..count].iter().map(|r| [IoSlice::new(&buf[r.clone()])]).collect();
    let addrs = vec![to; count];
    let sent = sendmmsg(socket.as_raw_fd(), &mut headers, &iovs, addrs, [], MsgFlags::MSG_DONTWAIT)?;
    Ok(sent.count())
}

fn std_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_goes_through_in_order_with_headers() -> io::Result<()> {
        let receiver = UdpSocket::bind("127.0.0.1:0").await?;
        let sender = UdpSocket::bind("127.0.0.1:0").await?;
        sender.connect(receiver.local_addr()?).await?;
        let buf: Vec<u8> = (0..=255).collect();
        let ranges: Vec<Range<usize>> = (0..40).map(|i| i..i + 1 + i % 7).collect();
        let sent = send(&sender, None, &buf, &ranges).await;
        assert_eq!((sent.sent, sent.failed), (40, 0));

        let mut slots = Slots::new(BATCH, 4, 16);
        let mut got = Vec::new();
        let mut seen = Vec::new();
        while seen.len() < ranges.len() {
            slots.recv(&receiver, &mut got).await?;
            assert!(!got.is_empty() && got.len() <= BATCH);
            for datagram in &got {
                assert_eq!(datagram.from, Some(sender.local_addr()?));
                seen.push(slots.datagram(datagram).to_vec());
            }
        }
        let expected: Vec<Vec<u8>> = ranges.iter().map(|r| buf[r.clone()].to_vec()).collect();
        assert_eq!(seen, expected);

        // A header goes in front of the datagram in its slot; one too big for the headroom is refused.
        let first = got[0];
        let range = slots.prepend(&first, b"hdr").expect("fits");
        assert_eq!(&slots.bytes()[range.start..range.start + 3], b"hdr");
        assert_eq!(range.len(), 3 + first.len);
        assert_eq!(slots.prepend(&first, b"too long"), None);
        Ok(())
    }
}
