//! The fast path's wire format: recognise a plain query and turn a prebuilt response into its answer.
//!
//! A prebuilt response ([`crate::view::View::answer`]) is the whole message the catalog would send for a query
//! without EDNS, with ID 0 and RD/CD clear, encoded by hickory. [`respond`] copies it and sets what depends on the
//! query: the ID, RD and CD (as hickory's `Metadata::response_from_request` does), the question's name as asked, in
//! the question and as the first answer's owner (later answers point to that one, so they echo its case too) and, when
//! the query had an OPT record, the response's OPT record (as hickory's `Catalog` builds it: payload at least 512,
//! version 0, the DO bit copied, no options). A negative answer ([`Relocatable`]) is built once per zone for a question
//! of the zone's origin; [`respond_relocated`] puts the question asked in its place and moves every compression
//! pointer after it by the difference in length (hickory never points into the question, which it copies as
//! received). Anything else a query may carry sends it to the catalog: [`parse`] returns `None`.
use hickory_server::proto::rr::RecordType;

/// Length of the OPT record [`respond`] appends: root name, type, class, TTL, RDLENGTH.
pub const OPT_LEN: usize = 11;

/// The largest UDP response every client accepts (RFC 1035); prebuilt responses stay within it, OPT included.
pub const MAX_PLAIN_UDP: usize = 512;

/// Length of the message header; the question follows it.
pub const HEADER_LEN: usize = 12;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const FLAG_RD: u8 = 0x01;
const FLAG_CD: u8 = 0x10;
/// The DO bit in the first byte of an OPT record's flags (RFC 3225).
const FLAG_DO: u8 = 0x80;
/// EDNS options hickory keeps as opaque bytes (COOKIE, PADDING); any other option goes to the catalog.
const OPAQUE_OPTIONS: [u16; 2] = [10, 12];

/// The question types the fast path answers: A and AAAA (prebuilt answers, NODATA, NXDOMAIN), SRV (the same), TXT
/// (NODATA and NXDOMAIN only).
const TYPES: [(u16, RecordType); 4] =
    [(1, RecordType::A), (28, RecordType::AAAA), (33, RecordType::SRV), (16, RecordType::TXT)];

/// A query the fast path may answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainQuery<'a> {
    /// The question's name, wire format, as asked (any case).
    pub qname: &'a [u8],
    /// A, AAAA, SRV or TXT.
    pub qtype: RecordType,
    /// The whole question: name, type, class.
    question: &'a [u8],
    id: [u8; 2],
    /// The query's RD bit (byte 2) and CD bit (byte 3), in place.
    rd: u8,
    cd: u8,
    /// The requestor's UDP payload size and DO bit, when the query had an OPT record.
    edns: Option<(u16, bool)>,
}

/// Recognises a standard query with one IN A, AAAA, SRV or TXT question, no compression, no records but an optional plain
/// OPT record (version 0, no options but cookies or padding), and nothing after it.
pub fn parse(packet: &[u8]) -> Option<PlainQuery<'_>> {
    let header = packet.get(..HEADER_LEN)?;
    // QR clear and OPCODE 0 (QUERY); AA, TC, RA, Z, AD and RCODE of a query do not shape the answer.
    if header[2] & 0xf8 != 0 {
        return None;
    }
    let counts = [be16(header, 4)?, be16(header, 6)?, be16(header, 8)?, be16(header, 10)?];
    if counts[..3] != [1, 0, 0] || counts[3] > 1 {
        return None;
    }
    let name_len = name_len(&packet[HEADER_LEN..])?;
    let question_end = HEADER_LEN + name_len + 4;
    let question = packet.get(HEADER_LEN..question_end)?;
    let code = be16(question, name_len)?;
    let (_, qtype) = TYPES.iter().find(|(c, _)| *c == code)?;
    let qtype = *qtype;
    if be16(question, name_len + 2)? != CLASS_IN {
        return None;
    }
    let rest = &packet[question_end..];
    let edns = match counts[3] {
        0 if rest.is_empty() => None,
        1 => Some(plain_opt(rest)?),
        _ => return None,
    };
    Some(PlainQuery {
        qname: &question[..name_len],
        qtype,
        question,
        id: [header[0], header[1]],
        rd: header[2] & FLAG_RD,
        cd: header[3] & FLAG_CD,
        edns,
    })
}

/// Appends the answer to `query` to `out`, from `prebuilt` (built for the question in lower case); `false` (and `out`
/// untouched) when `prebuilt` does not answer this question.
pub fn respond(query: &PlainQuery<'_>, prebuilt: &[u8], out: &mut Vec<u8>) -> bool {
    let name_len = query.qname.len();
    let Some(question) = prebuilt.get(HEADER_LEN..HEADER_LEN + query.question.len()) else {
        return false;
    };
    if !question[..name_len].eq_ignore_ascii_case(query.qname) || question[name_len..] != query.question[name_len..] {
        return false;
    }
    let start = out.len();
    out.extend_from_slice(prebuilt);
    let message = &mut out[start..];
    message[HEADER_LEN..HEADER_LEN + name_len].copy_from_slice(query.qname);
    let owner = first_answer(query.question.len());
    if let Some(first) = message.get_mut(owner..owner + name_len) {
        first.copy_from_slice(query.qname);
    }
    if !finish(query, out, start) {
        out.truncate(start);
        return false;
    }
    true
}

/// A whole response prepared for one question that answers any question of the same type in its place (see the
/// module's documentation): NXDOMAIN or NODATA with the zone's SOA.
#[derive(Debug, Clone)]
pub struct Relocatable {
    message: Box<[u8]>,
    /// Length of the question it was built with.
    question_len: usize,
    /// Where its compression pointers are.
    pointers: Box<[usize]>,
}

impl Relocatable {
    /// `message` (one question, no OPT record) with its compression pointers found; `None` when a record of a type
    /// whose names this module does not know is in it, or a pointer points into the question.
    pub fn new(message: Vec<u8>) -> Option<Self> {
        let counts = [be16(&message, 4)?, be16(&message, 6)?, be16(&message, 8)?, be16(&message, 10)?];
        if counts[0] != 1 {
            return None;
        }
        let question_len = name_len(message.get(HEADER_LEN..)?)? + 4;
        let question_end = HEADER_LEN + question_len;
        let mut pointers = Vec::new();
        let mut at = question_end;
        for _ in 0..counts[1] + counts[2] + counts[3] {
            at = name_pointers(&message, at, &mut pointers)?;
            let rtype = be16(&message, at)?;
            let rdlen = usize::from(be16(&message, at + 8)?);
            let rdata = at + 10;
            let end = rdata + rdlen;
            let names_at = match rtype {
                1 | 16 | 28 => None,
                2 | 5 | 12 => Some((rdata, 1)),
                6 => Some((rdata, 2)),
                15 => Some((rdata + 2, 1)),
                33 => Some((rdata + 6, 1)),
                _ => return None,
            };
            if let Some((mut name, count)) = names_at {
                for _ in 0..count {
                    name = name_pointers(&message, name, &mut pointers)?;
                }
                if name > end {
                    return None;
                }
            }
            at = end;
        }
        if at != message.len() {
            return None;
        }
        for &pointer in &pointers {
            if usize::from(be16(&message, pointer)? & 0x3fff) < question_end {
                return None;
            }
        }
        Some(Self { message: message.into_boxed_slice(), question_len, pointers: pointers.into_boxed_slice() })
    }

    /// The message as built, for its own question.
    pub fn message(&self) -> &[u8] {
        &self.message
    }
}

/// Appends the answer to `query` to `out`, from `relocatable` with `query`'s question in place of its own; `false`
/// (and `out` untouched) when a pointer would not fit or the answer would not fit 512 bytes.
pub fn respond_relocated(query: &PlainQuery<'_>, relocatable: &Relocatable, out: &mut Vec<u8>) -> bool {
    let Some(rest) = relocatable.message.get(HEADER_LEN + relocatable.question_len..) else {
        return false;
    };
    let start = out.len();
    out.extend_from_slice(&relocatable.message[..HEADER_LEN]);
    out.extend_from_slice(query.question);
    out.extend_from_slice(rest);
    let grown = query.question.len().wrapping_sub(relocatable.question_len);
    let moved = start + HEADER_LEN + query.question.len();
    for &pointer in &relocatable.pointers {
        let at = pointer - HEADER_LEN - relocatable.question_len + moved;
        let target = usize::from(u16::from_be_bytes([out[at], out[at + 1]]) & 0x3fff).wrapping_add(grown);
        let Some(value) = u16::try_from(target).ok().filter(|t| *t < 0x4000) else {
            out.truncate(start);
            return false;
        };
        out[at..at + 2].copy_from_slice(&(0xc000 | value).to_be_bytes());
    }
    if !finish(query, out, start) || out.len() - start > MAX_PLAIN_UDP {
        out.truncate(start);
        return false;
    }
    true
}

/// Sets the ID, RD and CD of the response at `out[start..]` from `query`, and appends the OPT record when the query
/// had one.
fn finish(query: &PlainQuery<'_>, out: &mut Vec<u8>, start: usize) -> bool {
    let message = &mut out[start..];
    message[0..2].copy_from_slice(&query.id);
    message[2] |= query.rd;
    message[3] |= query.cd;
    if let Some((payload, dnssec_ok)) = query.edns {
        let Some(additionals) = u16::from_be_bytes([message[10], message[11]]).checked_add(1) else {
            return false;
        };
        message[10..12].copy_from_slice(&additionals.to_be_bytes());
        let [hi, lo] = payload.max(512).to_be_bytes();
        let [t_hi, t_lo] = TYPE_OPT.to_be_bytes();
        let flags = if dnssec_ok { FLAG_DO } else { 0 };
        out.extend_from_slice(&[0, t_hi, t_lo, hi, lo, 0, 0, flags, 0, 0, 0]);
    }
    true
}

/// Walks the name at `bytes[at..]`, noting where it ends in a compression pointer; the offset after it.
fn name_pointers(bytes: &[u8], mut at: usize, pointers: &mut Vec<usize>) -> Option<usize> {
    loop {
        let len = *bytes.get(at)?;
        match len {
            0 => return Some(at + 1),
            1..=63 => at += 1 + usize::from(len),
            0xc0..=0xff => {
                pointers.push(at);
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// Where the first answer record starts in a message with one question of `question_len` bytes; a prebuilt
/// response writes its owner out there.
pub const fn first_answer(question_len: usize) -> usize {
    HEADER_LEN + question_len
}

/// `name` (wire format) in lower case: `name` itself when it has no upper-case letter, else a copy in `buf`. Length
/// octets are below 64, so lower-casing every ASCII letter touches only the labels.
pub fn lowercase<'a>(name: &'a [u8], buf: &'a mut [u8; 255]) -> Option<&'a [u8]> {
    if !name.iter().any(u8::is_ascii_uppercase) {
        return Some(name);
    }
    let copy = buf.get_mut(..name.len())?;
    copy.copy_from_slice(name);
    copy.make_ascii_lowercase();
    Some(copy)
}

/// The suffixes of a wire-format name, longest first, down to the root: each is itself a wire-format name.
pub fn suffixes(name: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(name);
    std::iter::from_fn(move || {
        let current = rest?;
        rest = match current.first() {
            Some(&len) if len > 0 => current.get(1 + usize::from(len)..),
            _ => None,
        };
        Some(current)
    })
}

/// Length of the uncompressed name at the start of `bytes`, terminator included; `None` if malformed, compressed
/// or longer than 255 bytes.
fn name_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len >= 64 {
            return None;
        }
        at += 1 + len;
        if at > 255 {
            return None;
        }
        if len == 0 {
            return Some(at);
        }
    }
}

/// The payload size and DO bit of an OPT record that is all of `rest`: root owner, version 0, well-formed opaque
/// options.
fn plain_opt(rest: &[u8]) -> Option<(u16, bool)> {
    let fixed = rest.get(..OPT_LEN)?;
    if fixed[0] != 0 || be16(fixed, 1)? != TYPE_OPT || fixed[6] != 0 {
        return None;
    }
    let dnssec_ok = fixed[7] & FLAG_DO != 0;
    let rdlen = usize::from(be16(fixed, 9)?);
    let mut options = rest.get(OPT_LEN..)?;
    if options.len() != rdlen {
        return None;
    }
    while !options.is_empty() {
        let code = be16(options, 0)?;
        let len = usize::from(be16(options, 2)?);
        if !OPAQUE_OPTIONS.contains(&code) {
            return None;
        }
        options = options.get(4 + len..)?;
    }
    Some((be16(fixed, 3)?, dnssec_ok))
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(flags: [u8; 2], counts: [u16; 4], question: &[u8], rest: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0xab, 0xcd, flags[0], flags[1]];
        for count in counts {
            bytes.extend_from_slice(&count.to_be_bytes());
        }
        bytes.extend_from_slice(question);
        bytes.extend_from_slice(rest);
        bytes
    }

    const WWW_A: &[u8] = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01";

    #[test]
    fn parses_a_plain_query() {
        let bytes = packet([1, 0], [1, 0, 0, 0], WWW_A, &[]);
        let query = parse(&bytes).expect("plain");
        assert_eq!(query.qname, b"\x03www\x07example\x04test\x00");
        assert_eq!(query.qtype, RecordType::A);
        assert_eq!(query.edns, None);
        assert_eq!(query.rd, 1);
    }

    #[test]
    fn parses_opt_with_a_cookie_but_not_other_options() {
        let cookie = [0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        let bytes = packet([0, 0], [1, 0, 0, 1], WWW_A, &cookie);
        assert_eq!(parse(&bytes).expect("plain").edns, Some((1232, false)));
        let mut with_do = cookie;
        with_do[7] = 0x80;
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 1], WWW_A, &with_do)).expect("plain").edns, Some((1232, true)));
        let mut nsid = cookie;
        nsid[12] = 3;
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 1], WWW_A, &nsid)), None);
        let mut short = cookie.to_vec();
        short.pop();
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 1], WWW_A, &short)), None);
        let mut version1 = cookie;
        version1[6] = 1;
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 1], WWW_A, &version1)), None);
    }

    #[test]
    fn refuses_what_the_catalog_must_see() {
        let mx = b"\x03www\x07example\x04test\x00\x00\x0f\x00\x01";
        let chaos = b"\x03www\x07example\x04test\x00\x00\x01\x00\x03";
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 0], mx, &[])), None);
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 0], chaos, &[])), None);
        assert_eq!(parse(&packet([0x28, 0], [1, 0, 0, 0], WWW_A, &[])), None, "UPDATE");
        assert_eq!(parse(&packet([0x80, 0], [1, 0, 0, 0], WWW_A, &[])), None, "response");
        assert_eq!(parse(&packet([0, 0], [2, 0, 0, 0], WWW_A, &[])), None);
        assert_eq!(parse(&packet([0, 0], [1, 1, 0, 0], WWW_A, &[])), None);
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 0], &WWW_A[..10], &[])), None);
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 0], b"\xc0\x0c\x00\x01\x00\x01", &[])), None);
        let long: Vec<u8> = (0..5).flat_map(|_| std::iter::once(63).chain([b'a'; 63])).chain([0, 0, 1, 0, 1]).collect();
        assert_eq!(parse(&packet([0, 0], [1, 0, 0, 0], &long, &[])), None, "over 255 bytes");
    }

    #[test]
    fn respond_patches_id_flags_and_opt() {
        let query_bytes = packet([1, 0x10], [1, 0, 0, 1], WWW_A, &[0, 0, 41, 0, 100, 0, 0, 0, 0, 0, 0]);
        let query = parse(&query_bytes).expect("plain");
        let prebuilt = packet([0x84, 0], [1, 0, 0, 0], WWW_A, &[]);
        let mut out = Vec::new();
        assert!(respond(&query, &prebuilt, &mut out));
        assert_eq!(&out[..4], &[0xab, 0xcd, 0x85, 0x10]);
        assert_eq!(out[11], 1);
        assert_eq!(&out[out.len() - OPT_LEN..], &[0, 0, 41, 2, 0, 0, 0, 0, 0, 0, 0], "payload raised to 512");
        let other = packet([0x84, 0], [1, 0, 0, 0], b"\x03wwx\x07example\x04test\x00\x00\x01\x00\x01", &[]);
        assert!(!respond(&query, &other, &mut out));
    }

    #[test]
    fn respond_echoes_the_question_case_and_the_do_bit() {
        let mixed = b"\x03wWw\x07ExAmple\x04TEST\x00\x00\x01\x00\x01";
        let query_bytes = packet([0, 0], [1, 0, 0, 1], mixed, &[0, 0, 41, 4, 208, 0, 0, 0x80, 0, 0, 0]);
        let query = parse(&query_bytes).expect("plain");
        // The prebuilt answer: the question in lower case, an A record owned by the same name written out, a second
        // owned by a pointer to the first.
        let mut answers = WWW_A.to_vec();
        answers.extend_from_slice(&[0, 0, 0, 30, 0, 4, 198, 51, 100, 1]);
        answers.extend_from_slice(&[0xc0, 0x22, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 198, 51, 100, 2]);
        let prebuilt = packet([0x84, 0], [1, 2, 0, 0], WWW_A, &answers);
        let mut out = Vec::new();
        assert!(respond(&query, &prebuilt, &mut out));
        assert_eq!(&out[HEADER_LEN..HEADER_LEN + mixed.len()], mixed, "the question as asked");
        let answer_section = &out[HEADER_LEN + mixed.len()..];
        assert_eq!(&answer_section[..mixed.len()], mixed, "the first owner as asked");
        assert_eq!(&answer_section[mixed.len()..answers.len()], &answers[mixed.len()..], "the rest untouched");
        assert_eq!(&out[out.len() - OPT_LEN..], &[0, 0, 41, 4, 208, 0, 0, 0x80, 0, 0, 0], "DO copied");
        let aaaa = b"\x03wWw\x07ExAmple\x04TEST\x00\x00\x1c\x00\x01";
        let query_bytes = packet([0, 0], [1, 0, 0, 0], aaaa, &[]);
        assert!(!respond(&parse(&query_bytes).expect("plain"), &prebuilt, &mut out), "another type");
    }

    #[test]
    fn lowercase_copies_only_when_needed() {
        let mut buf = [0; 255];
        let lower = b"\x03www\x04test\x00";
        assert!(std::ptr::eq(lowercase(lower, &mut buf).expect("fits"), &lower[..]));
        assert_eq!(lowercase(b"\x03WwW\x04TeSt\x00", &mut buf), Some(&lower[..]));
    }

    #[test]
    fn suffixes_walk_to_the_root() {
        let all: Vec<&[u8]> = suffixes(b"\x03www\x07example\x00").collect();
        assert_eq!(all, [&b"\x03www\x07example\x00"[..], b"\x07example\x00", b"\x00"]);
    }
}
