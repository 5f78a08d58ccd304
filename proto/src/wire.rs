//! Byte-level encoding shared by every frame: the frame envelope, bounded
//! strings, socket addresses, and the error a decoder returns on bad bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

/// Every frame is `type: u8`, `length: u16` (big endian), then `length` bytes.
pub const HEADER_LEN: usize = 3;

/// The largest payload a frame may carry. Decoders refuse a larger length
/// before buffering any of it, so a peer cannot make us allocate more.
pub const MAX_PAYLOAD: usize = 16 * 1024;

/// The longest name (agent, service) on the wire, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The longest free-text message (refusal reasons) on the wire, in bytes.
pub const MAX_MESSAGE_LEN: usize = 512;

/// Why bytes from a peer were rejected. Every variant means the peer is broken
/// or hostile; the caller closes that peer and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("frame type 0x{ty:02x} is truncated")]
    Truncated { ty: u8 },
    #[error("frame type 0x{ty:02x} has {extra} trailing bytes")]
    Trailing { ty: u8, extra: usize },
    #[error("invalid {field}")]
    Invalid { field: &'static str },
}

/// A complete frame found at the start of a buffer: its type and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawFrame<'a> {
    pub ty: u8,
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// Bytes the whole frame (envelope and payload) takes.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Splits one frame off the start of `buf`. `Ok(None)` means the bytes so far
/// are a valid prefix and more are needed; the length is checked against
/// [`MAX_PAYLOAD`] as soon as the header is complete.
pub(crate) fn split_frame(buf: &[u8]) -> Result<Option<RawFrame<'_>>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let ty = header[0];
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    if len > MAX_PAYLOAD {
        return Err(DecodeError::TooLong {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|payload| RawFrame { ty, payload }))
}

/// Writes a frame whose payload is produced by `body`.
///
/// Payload sizes are bounded by construction (every field has a maximum), so
/// exceeding [`MAX_PAYLOAD`] is a bug in this crate, not a peer's doing.
pub(crate) fn put_frame(out: &mut BytesMut, ty: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u8(ty);
    out.put_u16(0);
    body(out);
    let len = out.len() - start - HEADER_LEN;
    assert!(len <= MAX_PAYLOAD, "frame payload bounded by field limits");
    let len = u16::try_from(len).expect("MAX_PAYLOAD fits in u16");
    out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// A cursor over one frame's payload. Every read is bounds-checked and names
/// the frame type in its error.
pub(crate) struct Reader<'a> {
    ty: u8,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(frame: RawFrame<'a>) -> Self {
        Self {
            ty: frame.ty,
            rest: frame.payload,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated { ty: self.ty });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A `u8`-length-prefixed name: 1 to [`MAX_NAME_LEN`] bytes of
    /// `[A-Za-z0-9._-]`.
    pub fn name(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        if !is_valid_name(bytes) {
            return Err(DecodeError::Invalid { field });
        }
        // Valid names are ASCII, hence UTF-8.
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid { field })
    }

    /// A `u16`-length-prefixed UTF-8 message of at most [`MAX_MESSAGE_LEN`] bytes.
    pub fn message(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > MAX_MESSAGE_LEN {
            return Err(DecodeError::Invalid { field });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid { field })
    }

    /// A socket address: family (4 or 6), the address, then the port.
    pub fn socket_addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => {
                let b = self.take(4)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => {
                return Err(DecodeError::Invalid {
                    field: "address family",
                });
            }
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    /// Whether the whole payload has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Ends decoding: a frame must be consumed exactly.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                ty: self.ty,
                extra: self.rest.len(),
            })
        }
    }
}

/// Names on the wire and in configs: 1 to [`MAX_NAME_LEN`] bytes of
/// ASCII letters, digits, `.`, `_` and `-`.
pub fn is_valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn put_name(out: &mut BytesMut, name: &str) {
    debug_assert!(
        is_valid_name(name.as_bytes()),
        "names are validated on construction"
    );
    let bytes = &name.as_bytes()[..name.len().min(MAX_NAME_LEN)];
    out.put_u8(u8::try_from(bytes.len()).expect("MAX_NAME_LEN fits in u8"));
    out.put_slice(bytes);
}

pub(crate) fn put_message(out: &mut BytesMut, message: &str) {
    // Cut on a char boundary so the receiver always gets valid UTF-8.
    let mut end = message.len().min(MAX_MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(u16::try_from(end).expect("MAX_MESSAGE_LEN fits in u16"));
    out.put_slice(&message.as_bytes()[..end]);
}

pub(crate) fn put_socket_addr(out: &mut BytesMut, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_frame_needs_header_then_payload() {
        assert_eq!(split_frame(&[]), Ok(None));
        assert_eq!(split_frame(&[1, 0]), Ok(None));
        assert_eq!(split_frame(&[1, 0, 2, 9]), Ok(None));
        let f = split_frame(&[1, 0, 2, 9, 8, 7]).unwrap().unwrap();
        assert_eq!((f.ty, f.payload, f.len()), (1, &[9u8, 8][..], 5));
    }

    #[test]
    fn split_frame_refuses_oversized_length_from_header_alone() {
        let len = u16::try_from(MAX_PAYLOAD + 1).unwrap().to_be_bytes();
        assert_eq!(
            split_frame(&[1, len[0], len[1]]),
            Err(DecodeError::TooLong {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
    }

    #[test]
    fn names_are_bounded_ascii() {
        assert!(is_valid_name(b"home-nas_1.lan"));
        assert!(!is_valid_name(b""));
        assert!(!is_valid_name(b"has space"));
        assert!(!is_valid_name("ünï".as_bytes()));
        assert!(!is_valid_name(&[b'a'; MAX_NAME_LEN + 1]));
    }

    #[test]
    fn messages_are_cut_on_char_boundaries() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let mut out = BytesMut::new();
        put_message(&mut out, &long);
        let len = usize::from(u16::from_be_bytes([out[0], out[1]]));
        assert!(len <= MAX_MESSAGE_LEN);
        assert!(std::str::from_utf8(&out[2..]).is_ok());
    }
}
