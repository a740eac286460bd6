//! Datagrams in batches on tokio's UDP sockets through nix's safe wrappers: recvmmsg(2) with UDP GRO in, and
//! sendmmsg(2) with UDP GSO out, so a burst costs the kernel's UDP path once rather than once per datagram.
//!
//! Receiving: a socket with [`enable_gro`] may get a burst from one sender as one buffer of equal segments (the
//! last may be shorter) and its segment size in a control message; [`Slots::recv`] cuts it back into datagrams.
//! Sending: [`send`] gathers runs of equal-size datagrams (the last of a run may be shorter) of at most
//! [`GSO_SEGMENTS`] datagrams and 64 KiB, and hands each run to the kernel as one GSO message that it cuts into
//! datagrams as late as it can; a PROXY header is one more iovec in front of each datagram, so every datagram of a
//! run carries its own. A socket whose device cannot take GSO (EIO or EINVAL) is remembered in its [`Gso`] and gets
//! plain sendmmsg from then on. nix's header arrays hold raw pointers (not `Send`), so they live only inside the
//! synchronous closure of one system call.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    ops::Range,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
};

use nix::{
    cmsg_space,
    errno::Errno,
    sys::socket::{
        ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, setsockopt,
        sockopt::UdpGroSegment,
    },
};
use tokio::{io::Interest, net::UdpSocket};

/// Most messages one system call receives or sends.
pub const BATCH: usize = 32;
/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS` before Linux 6.9).
pub const GSO_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO message: an IPv4 packet's 65,535 bytes less the IP and UDP headers.
const GSO_BYTES: usize = 65_507;

/// One datagram of the last [`Slots::recv`]: where it is in the buffer and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Offset of its first byte in [`Slots::bytes`].
    pub start: usize,
    /// Bytes received.
    pub len: usize,
    /// The sender (for a connected socket, its peer).
    pub from: Option<SocketAddr>,
}

impl Datagram {
    /// Its bytes' range in [`Slots::bytes`].
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Asks the kernel to hand over a burst from one sender as one buffer ([`Slots::recv`] splits it). Only for
/// sockets read with slots of 64 KiB.
pub fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
    setsockopt(socket, UdpGroSegment, &true).map_err(io::Error::from)
}

/// Receive buffers: up to [`BATCH`] messages of up to `capacity` bytes each.
#[derive(Debug)]
pub struct Slots {
    buf: Vec<u8>,
    size: usize,
    count: usize,
}

impl Slots {
    /// `count` slots (at most [`BATCH`]) of `capacity` bytes.
    pub fn new(count: usize, capacity: usize) -> Self {
        let count = count.clamp(1, BATCH);
        // Zeroed pages are mapped lazily: slots cost memory only as far as datagrams fill them.
        Self { buf: vec![0; capacity * count], size: capacity, count }
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

    /// Waits for datagrams and receives as many messages as are queued, up to the slot count; their datagrams go
    /// into `got` (cleared first), a GRO buffer's one by one. Returns the number of messages.
    pub async fn recv(&mut self, socket: &UdpSocket, got: &mut Vec<Datagram>) -> io::Result<usize> {
        loop {
            socket.readable().await?;
            match socket.try_io(Interest::READABLE, || self.recv_now(socket, got)) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return result,
            }
        }
    }

    fn recv_now(&mut self, socket: &UdpSocket, got: &mut Vec<Datagram>) -> io::Result<usize> {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(self.count, Some(cmsg_space!(i32)));
        let size = self.size;
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            self.buf.chunks_exact_mut(size).map(|slot| [IoSliceMut::new(slot)]).collect();
        let received = recvmmsg(socket.as_raw_fd(), &mut headers, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
        got.clear();
        let mut messages = 0;
        for (slot, message) in received.enumerate() {
            messages += 1;
            let from = message.address.and_then(std_addr);
            let segment = message
                .cmsgs()
                .into_iter()
                .flatten()
                .find_map(|cmsg| match cmsg {
                    ControlMessageOwned::UdpGroSegments(size) => usize::try_from(size).ok().filter(|&s| s > 0),
                    _ => None,
                })
                .unwrap_or(message.bytes.max(1));
            let start = slot * size;
            if message.bytes == 0 {
                got.push(Datagram { start, len: 0, from });
                continue;
            }
            for offset in (0..message.bytes).step_by(segment) {
                got.push(Datagram { start: start + offset, len: segment.min(message.bytes - offset), from });
            }
        }
        Ok(messages)
    }

    /// The bytes of a received datagram.
    pub fn datagram(&self, datagram: &Datagram) -> &[u8] {
        &self.buf[datagram.range()]
    }

    /// The whole buffer, which the datagrams' ranges index.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Whether a socket's GSO sends are taken: on until the kernel refuses one with EIO or EINVAL, then off for good.
#[derive(Debug)]
pub struct Gso {
    on: AtomicBool,
    segments: usize,
}

impl Default for Gso {
    fn default() -> Self {
        Self { on: AtomicBool::new(true), segments: GSO_SEGMENTS }
    }
}

impl Gso {
    /// Whether sends on this socket still try GSO.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Runs of up to `segments` datagrams, more than the kernel takes: how the tests make it refuse a GSO send.
    #[cfg(test)]
    fn with_segments(segments: usize) -> Self {
        Self { on: AtomicBool::new(true), segments }
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

/// Sends the datagrams at `ranges` of `buf`, each behind `header` when there is one, in order, to `to` (`None`: the
/// connected peer); waits while the socket is full. Runs of equal size go out as GSO messages while `gso` is on. A
/// datagram the kernel refuses is counted and skipped, so one bad datagram does not hold back the rest.
pub async fn send(
    socket: &UdpSocket,
    gso: &Gso,
    to: Option<SocketAddr>,
    header: Option<&[u8]>,
    buf: &[u8],
    ranges: &[Range<usize>],
) -> Sent {
    let header = header.unwrap_or_default();
    let to = to.map(SockaddrStorage::from);
    let mut runs = runs(ranges, header.len(), gso.is_on().then_some(gso.segments));
    let mut outcome = Sent::default();
    let mut next = 0;
    while next < runs.len() {
        if let Err(error) = socket.writable().await {
            outcome.failed += runs[next..].iter().map(|run| run.datagrams.len()).sum::<usize>();
            outcome.error = Some(error);
            break;
        }
        let group = group(&runs[next..]);
        match socket.try_io(Interest::WRITABLE, || send_now(socket, to, header, buf, ranges, group)) {
            Ok(n) => {
                outcome.sent += group[..n].iter().map(|run| run.datagrams.len()).sum::<usize>();
                next += n.max(1);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if group[0].segment.is_some() && gso_refused(&error) => {
                // Send the datagrams one per message instead: this run only when the refusal was about its size
                // (EMSGSIZE: larger than the path's MTU), otherwise every run left, and no more GSO on this socket.
                let end = if error.raw_os_error() == Some(Errno::EMSGSIZE as i32) {
                    next + 1
                } else {
                    gso.on.store(false, Ordering::Relaxed);
                    runs.len()
                };
                let datagrams = runs[next].datagrams.start..runs[end - 1].datagrams.end;
                runs.splice(next..end, datagrams.map(|i| Run { datagrams: i..i + 1, segment: None }));
            }
            Err(error) => {
                outcome.failed += runs[next].datagrams.len();
                outcome.error = Some(error);
                next += 1;
            }
        }
    }
    outcome
}

/// Datagrams sent as one message: indices into the ranges, and the GSO segment size when there are several.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    datagrams: Range<usize>,
    segment: Option<usize>,
}

/// Cuts the datagrams (each `header` bytes longer on the wire) into runs: with GSO (at most `segments` each),
/// consecutive datagrams of one size, the last of a run possibly shorter; without, one datagram each.
fn runs(ranges: &[Range<usize>], header: usize, segments: Option<usize>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    // Whether the last run may still grow: GSO is on and its datagrams are all of its first one's size.
    let mut open = false;
    for (i, range) in ranges.iter().enumerate() {
        let size = header + range.len();
        if let (true, Some(limit), Some(run)) = (open, segments, runs.last_mut()) {
            let first = header + ranges[run.datagrams.start].len();
            let count = run.datagrams.len();
            // An empty datagram would vanish from a GSO message; a shorter one ends its run.
            if size > 0 && size <= first && count < limit && first * count + size <= GSO_BYTES {
                run.datagrams.end = i + 1;
                run.segment = Some(first);
                open = size == first;
                continue;
            }
        }
        runs.push(Run { datagrams: i..i + 1, segment: None });
        open = segments.is_some() && size > 0;
    }
    runs
}

/// The runs at the front of `runs` that one sendmmsg can carry: as many as [`BATCH`] with the same segment size
/// (the control message is shared), or single datagrams.
fn group(runs: &[Run]) -> &[Run] {
    let same = runs.iter().take(BATCH).take_while(|run| run.segment == runs[0].segment).count();
    &runs[..same.max(1)]
}

fn send_now(
    socket: &UdpSocket,
    to: Option<SockaddrStorage>,
    header: &[u8],
    buf: &[u8],
    ranges: &[Range<usize>],
    group: &[Run],
) -> io::Result<usize> {
    // Every datagram's header and payload as iovecs, one stretch per message; without a header, payloads that
    // follow each other in `buf` (a GRO buffer's) merge into one iovec.
    const HEADER: Range<usize> = usize::MAX..usize::MAX;
    let mut pieces: Vec<Range<usize>> = Vec::new();
    let mut bounds = Vec::with_capacity(group.len());
    for run in group {
        let first = pieces.len();
        for range in &ranges[run.datagrams.clone()] {
            if !header.is_empty() {
                pieces.push(HEADER);
            } else if let Some(last) = pieces[first..].last_mut().filter(|last| last.end == range.start) {
                last.end = range.end;
                continue;
            }
            pieces.push(range.clone());
        }
        bounds.push(first..pieces.len());
    }
    let iovs: Vec<IoSlice<'_>> = pieces
        .iter()
        .map(|piece| if *piece == HEADER { IoSlice::new(header) } else { IoSlice::new(&buf[piece.clone()]) })
        .collect();
    let messages: Vec<&[IoSlice<'_>]> = bounds.into_iter().map(|bound| &iovs[bound]).collect();
    let addrs = vec![to; group.len()];
    let sent = match group[0].segment.map(|size| u16::try_from(size).unwrap_or(u16::MAX)) {
        Some(segment) => {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(group.len(), Some(cmsg_space!(u16)));
            let cmsgs = [ControlMessage::UdpGsoSegments(&segment)];
            sendmmsg(socket.as_raw_fd(), &mut headers, &messages, addrs, cmsgs, MsgFlags::MSG_DONTWAIT)?.count()
        }
        None => {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(group.len(), None);
            sendmmsg(socket.as_raw_fd(), &mut headers, &messages, addrs, [], MsgFlags::MSG_DONTWAIT)?.count()
        }
    };
    Ok(sent)
}

/// Errors by which the kernel refuses a GSO message, as opposed to refusing its datagrams.
fn gso_refused(error: &io::Error) -> bool {
    matches!(error.raw_os_error().map(Errno::from_raw), Some(Errno::EIO | Errno::EINVAL | Errno::EMSGSIZE))
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

    /// Payloads of these sizes, cut from one buffer back to back, each starting with its index.
    fn payloads(sizes: &[usize]) -> (Vec<u8>, Vec<Range<usize>>) {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let start = buf.len();
            buf.extend((0..size).map(|j| if j == 0 { i as u8 } else { (i * 7 + j) as u8 }));
            ranges.push(start..buf.len());
        }
        (buf, ranges)
    }

    /// Receives until `count` datagrams came; returns them and the number of messages they came in.
    async fn receive(receiver: &UdpSocket, from: SocketAddr, count: usize) -> io::Result<(Vec<Vec<u8>>, usize)> {
        let mut slots = Slots::new(BATCH, 65_535);
        let mut got = Vec::new();
        let (mut seen, mut messages) = (Vec::new(), 0);
        while seen.len() < count {
            let received = tokio::time::timeout(std::time::Duration::from_secs(5), slots.recv(receiver, &mut got))
                .await
                .map_err(|_| io::Error::other(format!("{} of {count} datagrams came", seen.len())))??;
            messages += received;
            for datagram in &got {
                assert_eq!(datagram.from, Some(from));
                seen.push(slots.datagram(datagram).to_vec());
            }
        }
        Ok((seen, messages))
    }

    async fn pair() -> io::Result<(UdpSocket, UdpSocket)> {
        let receiver = UdpSocket::bind("127.0.0.1:0").await?;
        let sender = UdpSocket::bind("127.0.0.1:0").await?;
        sender.connect(receiver.local_addr()?).await?;
        Ok((sender, receiver))
    }

    #[test]
    fn runs_are_equal_sizes_a_shorter_one_last() {
        let ranges: Vec<Range<usize>> = [64, 64, 64, 30, 64, 64, 100, 100, 0, 0, 50, 50]
            .iter()
            .scan(0, |at, &len| {
                *at += len;
                Some(*at - len..*at)
            })
            .collect();
        let summary = |runs: Vec<Run>| -> Vec<(Range<usize>, Option<usize>)> {
            runs.into_iter().map(|run| (run.datagrams, run.segment)).collect()
        };
        assert_eq!(
            summary(runs(&ranges, 0, Some(GSO_SEGMENTS))),
            [(0..4, Some(64)), (4..6, Some(64)), (6..8, Some(100)), (8..9, None), (9..10, None), (10..12, Some(50))]
        );
        // A header makes every datagram longer by its size: an empty one is a header alone, and can end a run.
        assert_eq!(
            summary(runs(&ranges, 8, Some(GSO_SEGMENTS))),
            [(0..4, Some(72)), (4..6, Some(72)), (6..9, Some(108)), (9..10, None), (10..12, Some(58))]
        );
        // Without GSO, one datagram per message.
        assert_eq!(summary(runs(&ranges, 0, None)), (0..12).map(|i| (i..i + 1, None)).collect::<Vec<_>>());
        // At most `segments` datagrams and 64 KiB per run.
        let equal: Vec<Range<usize>> = (0..10).map(|i| i * 10..i * 10 + 10).collect();
        assert_eq!(summary(runs(&equal, 0, Some(4))), [(0..4, Some(10)), (4..8, Some(10)), (8..10, Some(10))]);
        let big: Vec<Range<usize>> = (0..3).map(|i| i * 30_000..(i + 1) * 30_000).collect();
        assert_eq!(summary(runs(&big, 0, Some(GSO_SEGMENTS))), [(0..2, Some(30_000)), (2..3, None)]);
    }

    #[tokio::test]
    async fn a_burst_of_mixed_sizes_arrives_complete_in_order_with_headers() -> io::Result<()> {
        let (sender, receiver) = pair().await?;
        enable_gro(&receiver)?;
        // Runs of equal sizes, shorter datagrams ending them, empty ones, a run longer than one GSO message.
        let mut sizes = vec![100; 10];
        sizes.extend([100, 100, 40, 7, 7, 7, 0, 0, 1400, 1400, 1399, 1]);
        sizes.extend(vec![64; 150]);
        sizes.extend((1..40).map(|i| i * 13));
        let (buf, ranges) = payloads(&sizes);
        let gso = Gso::default();
        let sent = send(&sender, &gso, None, Some(b"HDR!"), &buf, &ranges).await;
        assert_eq!((sent.sent, sent.failed), (ranges.len(), 0), "{:?}", sent.error);
        assert!(gso.is_on());

        let (seen, messages) = receive(&receiver, sender.local_addr()?, ranges.len()).await?;
        let expected: Vec<Vec<u8>> = ranges.iter().map(|r| [&b"HDR!"[..], &buf[r.clone()]].concat()).collect();
        assert_eq!(seen, expected);
        // The runs went out as GSO messages and came in as GRO buffers, cut back into datagrams.
        assert!(messages < ranges.len() / 2, "{messages} messages for {} datagrams", ranges.len());

        // A receiver without GRO gets the same datagrams, one by one.
        let (sender, receiver) = pair().await?;
        let sent = send(&sender, &gso, None, None, &buf, &ranges).await;
        assert_eq!((sent.sent, sent.failed), (ranges.len(), 0), "{:?}", sent.error);
        let (seen, messages) = receive(&receiver, sender.local_addr()?, ranges.len()).await?;
        let expected: Vec<Vec<u8>> = ranges.iter().map(|r| buf[r.clone()].to_vec()).collect();
        assert_eq!(seen, expected);
        assert_eq!(messages, ranges.len());
        Ok(())
    }

    #[tokio::test]
    async fn a_refused_gso_send_falls_back_to_one_datagram_per_message() -> io::Result<()> {
        let (sender, receiver) = pair().await?;
        // 150 segments in one message: more than the kernel takes (64, or 128 since Linux 6.9), so it refuses the
        // message with EINVAL, as it does on a device without GSO.
        let gso = Gso::with_segments(150);
        let (buf, ranges) = payloads(&[100; 150]);
        let sent = send(&sender, &gso, None, None, &buf, &ranges).await;
        assert_eq!((sent.sent, sent.failed), (150, 0), "{:?}", sent.error);
        assert!(!gso.is_on(), "the refusal is remembered for the socket");
        let (seen, _) = receive(&receiver, sender.local_addr()?, 150).await?;
        let expected: Vec<Vec<u8>> = ranges.iter().map(|r| buf[r.clone()].to_vec()).collect();
        assert_eq!(seen, expected);

        // From then on, plain sendmmsg: a receiver with GRO gets one datagram per message.
        enable_gro(&receiver)?;
        let (buf, ranges) = payloads(&[50; 40]);
        let sent = send(&sender, &gso, None, None, &buf, &ranges).await;
        assert_eq!((sent.sent, sent.failed), (40, 0));
        let (seen, messages) = receive(&receiver, sender.local_addr()?, 40).await?;
        assert_eq!(seen, ranges.iter().map(|r| buf[r.clone()].to_vec()).collect::<Vec<_>>());
        assert_eq!(messages, 40);
        Ok(())
    }
}
