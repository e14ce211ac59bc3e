//! RFC 6455 framing, server side, as pure functions over bytes: parsing a client frame header,
//! unmasking, encoding server frame headers and close payloads. No I/O, so every rule of the
//! RFC that the server enforces is tested here directly.

use thiserror::Error;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(b: u8) -> Option<OpCode> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented, allowed between fragments.
    pub(crate) fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) fin: bool,
    pub(crate) opcode: OpCode,
    pub(crate) mask: [u8; 4],
    /// Payload length in bytes.
    pub(crate) len: u64,
}

/// A violation of the framing rules by the client. Each one ends the connection with 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub(crate) enum FrameError {
    #[error("reserved bits set (no extension was negotiated)")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("fragmented control frame")]
    ControlFragmented,
    #[error("payload length with the most significant bit set")]
    LengthOverflow,
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is incomplete")]
    ExpectedContinuation,
    #[error("close payload of one byte, or a close code that may not be sent")]
    BadClosePayload,
}

/// Parses a client frame header at the start of `buf`. `Ok(None)` means more bytes are needed;
/// otherwise returns the header and its length in bytes.
pub(crate) fn parse_header(buf: &[u8]) -> Result<Option<(Header, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let short = b1 & 0x7F;
    if opcode.is_control() {
        if short > 125 {
            return Err(FrameError::ControlTooLong);
        }
        if !fin {
            return Err(FrameError::ControlFragmented);
        }
    }
    let (len, at) = match short {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let len = u64::from_be_bytes(a);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthOverflow);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let Some(m) = buf.get(at..at + 4) else { return Ok(None) };
    let mask = [m[0], m[1], m[2], m[3]];
    Ok(Some((Header { fin, opcode, mask, len }, at + 4)))
}

/// Unmasks (or masks) a payload in place.
pub(crate) fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends an unmasked, final server frame header for a payload of `len` bytes.
pub(crate) fn write_header(out: &mut Vec<u8>, opcode: OpCode, len: usize) {
    out.push(0x80 | opcode.bits());
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// The largest header [`write_header`] produces.
pub(crate) const MAX_SERVER_HEADER: usize = 10;

/// The payload of a close frame: the code, then a reason cut to fit the 125-byte limit on a
/// character boundary.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// Parses a client's close payload: `None` when it carries no code. The reason must be UTF-8
/// (the caller checks it; see [`close_reason_is_valid`]).
pub(crate) fn parse_close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::BadClosePayload),
        [a, b, ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            // RFC 6455 §7.4: codes that may appear on the wire.
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if valid {
                Ok(Some(code))
            } else {
                Err(FrameError::BadClosePayload)
            }
        }
    }
}

/// Whether the reason part of a close payload (after the code) is valid UTF-8.
pub(crate) fn close_reason_is_valid(payload: &[u8]) -> bool {
    payload.get(2..).is_none_or(|r| std::str::from_utf8(r).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, op: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | op];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n <= 0xFFFF {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        f.extend_from_slice(&p);
        f
    }

    #[test]
    fn parses_masked_text_frame_of_each_length_form() {
        for n in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let f = client_frame(true, 1, &payload, [1, 2, 3, 4]);
            let (h, at) = parse_header(&f).expect("valid").expect("complete");
            assert_eq!((h.fin, h.opcode, h.len), (true, OpCode::Text, n as u64));
            let mut body = f[at..].to_vec();
            unmask(&mut body, h.mask);
            assert_eq!(body, payload, "length {n}");
        }
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let f = client_frame(true, 1, &[0u8; 300], [9, 9, 9, 9]);
        for cut in 0..8 {
            assert_eq!(parse_header(&f[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse_header(&f[..8]).expect("valid").is_some());
    }

    #[test]
    fn rejects_rule_violations() {
        let mut unmasked = client_frame(true, 1, b"hi", [0; 4]);
        unmasked[1] &= 0x7F;
        assert_eq!(parse_header(&unmasked), Err(FrameError::Unmasked));
        let mut rsv = client_frame(true, 1, b"hi", [1; 4]);
        rsv[0] |= 0x40;
        assert_eq!(parse_header(&rsv), Err(FrameError::ReservedBits));
        assert_eq!(parse_header(&client_frame(true, 3, b"", [1; 4])), Err(FrameError::UnknownOpcode(3)));
        assert_eq!(parse_header(&client_frame(true, 9, &[0; 126], [1; 4])), Err(FrameError::ControlTooLong));
        assert_eq!(parse_header(&client_frame(false, 9, b"", [1; 4])), Err(FrameError::ControlFragmented));
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(parse_header(&huge), Err(FrameError::LengthOverflow));
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        for (n, expected) in [(0usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            write_header(&mut out, OpCode::Text, n);
            assert_eq!(out.len(), expected, "length {n}");
            assert!(out.len() <= MAX_SERVER_HEADER);
            assert_eq!(out[0], 0x81);
            assert_eq!(out[1] & 0x80, 0, "server frames are unmasked");
        }
    }

    #[test]
    fn unmask_is_an_involution_at_any_length() {
        for n in 0..40 {
            let data: Vec<u8> = (0..n as u8).collect();
            let mut d = data.clone();
            unmask(&mut d, [0xA1, 0x02, 0xF3, 0x44]);
            if n > 0 {
                assert_ne!(d, data);
            }
            unmask(&mut d, [0xA1, 0x02, 0xF3, 0x44]);
            assert_eq!(d, data);
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close_code(&[]), Ok(None));
        assert_eq!(parse_close_code(&[3]), Err(FrameError::BadClosePayload));
        assert_eq!(parse_close_code(&close_payload(1000, "bye")), Ok(Some(1000)));
        assert_eq!(parse_close_code(&close_payload(4003, "")), Ok(Some(4003)));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(parse_close_code(&bad.to_be_bytes()), Err(FrameError::BadClosePayload), "{bad}");
        }
        assert!(close_reason_is_valid(&close_payload(1000, "ünïcode")));
        assert!(!close_reason_is_valid(&[0x03, 0xE8, 0xFF]));
        let long = "é".repeat(100);
        let p = close_payload(1001, &long);
        assert!(p.len() <= 125);
        assert!(close_reason_is_valid(&p));
    }
}
