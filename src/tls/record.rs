//! TLS 1.3 record protection after the handshake (RFC 8446 section 5), done by us so records are
//! sealed and opened in place in our own buffers: rustls runs the handshake and derives the
//! traffic secrets (and their updates); the bytes of established connections never pass
//! through its buffers.
//!
//! What must stay true:
//! - A nonce is never used twice with one key: every seal and every open takes the next sequence
//!   number, and an exhausted sequence is an error, not a wrap.
//! - Nothing a peer sends can panic or make us read past a record: lengths are checked before any
//!   slicing, and every failure names the alert the peer gets.

use std::io;
use std::ops::Range;

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

pub const HEADER: usize = 5;
/// Most plaintext in one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Most a peer may put in one record's body (plaintext, content type, padding, tag).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
pub const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
pub const TAG: usize = 16;

pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Alert descriptions we send or act on (RFC 8446 section 6).
pub mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const USER_CANCELED: u8 = 90;
}

/// A protocol violation: the alert we owe the peer and what went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub alert: u8,
    pub reason: &'static str,
}

impl Violation {
    pub fn new(alert: u8, reason: &'static str) -> Violation {
        Violation { alert, reason }
    }
}

impl From<Violation> for io::Error {
    fn from(v: Violation) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {}", v.reason))
    }
}

/// One direction's key, static IV and sequence number.
pub struct RecordKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl RecordKey {
    /// The key for `secrets`, starting at sequence number `seq`.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> io::Result<RecordKey> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            _ => return Err(io::Error::other("TLS: negotiated a cipher suite we do not offer")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| io::Error::other("TLS: bad traffic key length"))?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| io::Error::other("TLS: bad traffic IV length"))?;
        Ok(RecordKey { key: LessSafeKey::new(key), iv, seq })
    }

    /// Records protected with this key so far (the next sequence number).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The per-record nonce: the IV with the sequence number XORed into its low 8 bytes.
    fn next_nonce(&mut self) -> Result<Nonce, Violation> {
        if self.seq == u64::MAX {
            return Err(Violation::new(alert::INTERNAL_ERROR, "record sequence number exhausted"));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Seals the record that starts at `buf[start]`: the 5 header bytes there are placeholders,
    /// then the content, to which the content type and the tag are appended here.
    pub fn seal(&mut self, buf: &mut Vec<u8>, start: usize, content_type: u8) -> Result<(), Violation> {
        debug_assert!(buf.len() >= start + HEADER && buf.len() - start - HEADER <= MAX_PLAINTEXT);
        buf.push(content_type);
        let body = buf.len() - start - HEADER + TAG;
        let header = record_header(body);
        buf[start..start + HEADER].copy_from_slice(&header);
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut buf[start + HEADER..])
            .map_err(|_| Violation::new(alert::INTERNAL_ERROR, "sealing a record failed"))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens one whole record (`record` is its header and body), in place. Returns the inner
    /// content type and where the content lies in `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, Range<usize>), Violation> {
        let header: [u8; HEADER] = match record.get(..HEADER) {
            Some(h) => h.try_into().expect("5 bytes"),
            None => return Err(Violation::new(alert::DECODE_ERROR, "record shorter than its header")),
        };
        if header[0] != APPLICATION_DATA {
            return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "unprotected record after the handshake"));
        }
        let body = u16::from_be_bytes([header[3], header[4]]) as usize;
        if body > MAX_CIPHERTEXT {
            return Err(Violation::new(alert::RECORD_OVERFLOW, "record longer than 2^14 + 256 bytes"));
        }
        if record.len() != HEADER + body {
            return Err(Violation::new(alert::DECODE_ERROR, "record length does not match its header"));
        }
        if body < TAG + 1 {
            return Err(Violation::new(alert::BAD_RECORD_MAC, "record too short to be protected"));
        }
        let nonce = self.next_nonce()?;
        let inner = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER..])
            .map_err(|_| Violation::new(alert::BAD_RECORD_MAC, "record failed authentication"))?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(Violation::new(alert::UNEXPECTED_MESSAGE, "record without a content type"));
        };
        if type_at > MAX_PLAINTEXT {
            return Err(Violation::new(alert::RECORD_OVERFLOW, "record content longer than 2^14 bytes"));
        }
        Ok((inner[type_at], HEADER..HEADER + type_at))
    }
}

/// The header of a protected record with a body of `body` bytes.
fn record_header(body: usize) -> [u8; HEADER] {
    let len = (body as u16).to_be_bytes();
    [APPLICATION_DATA, 0x03, 0x03, len[0], len[1]]
}

/// The length of the whole record at the start of `buf` once all of it is there. A header that
/// announces more than a record may hold is refused as soon as it is seen, not waited out.
pub fn whole_record(buf: &[u8]) -> Result<Option<usize>, Violation> {
    let (Some(&a), Some(&b)) = (buf.get(3), buf.get(4)) else { return Ok(None) };
    let len = u16::from_be_bytes([a, b]) as usize;
    if len > MAX_CIPHERTEXT {
        return Err(Violation::new(alert::RECORD_OVERFLOW, "record longer than 2^14 + 256 bytes"));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

#[cfg(test)]
mod tests {
    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::*;

    fn key_pair() -> (RecordKey, RecordKey) {
        let secrets =
            || ConnectionTrafficSecrets::Aes256Gcm { key: AeadKey::from([7u8; 32]), iv: Iv::new([3u8; NONCE_LEN]) };
        (RecordKey::new(&secrets(), 5).unwrap(), RecordKey::new(&secrets(), 5).unwrap())
    }

    fn sealed(key: &mut RecordKey, content: &[u8], content_type: u8) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER];
        buf.extend_from_slice(content);
        key.seal(&mut buf, 0, content_type).unwrap();
        buf
    }

    #[test]
    fn sealed_records_open_in_order_and_not_out_of_it() {
        let (mut tx, mut rx) = key_pair();
        let first = sealed(&mut tx, b"first", APPLICATION_DATA);
        let second = sealed(&mut tx, b"second", ALERT);
        assert_eq!(first.len(), HEADER + 5 + 1 + TAG);
        assert_eq!(whole_record(&first), Ok(Some(first.len())));
        assert_eq!(whole_record(&first[..first.len() - 1]), Ok(None));
        assert_eq!(whole_record(&first[..4]), Ok(None));
        // Refused from its header alone: such a record would never fit the read buffer.
        assert_eq!(whole_record(&[23, 3, 3, 0xff, 0xff]).unwrap_err().alert, alert::RECORD_OVERFLOW);

        let mut r = first.clone();
        let (typ, range) = rx.open(&mut r).unwrap();
        assert_eq!((typ, &r[range]), (APPLICATION_DATA, &b"first"[..]));
        let mut r = second.clone();
        let (typ, range) = rx.open(&mut r).unwrap();
        assert_eq!((typ, &r[range]), (ALERT, &b"second"[..]));
        assert_eq!((tx.seq(), rx.seq()), (7, 7));

        // Replayed: the sequence number moved on, so the nonce differs and authentication fails.
        let mut r = first;
        assert_eq!(rx.open(&mut r).unwrap_err().alert, alert::BAD_RECORD_MAC);
    }

    #[test]
    fn tampering_and_malformed_records_name_their_alert() {
        let (mut tx, mut rx) = key_pair();
        let good = sealed(&mut tx, b"hello", APPLICATION_DATA);

        let mut flipped = good.clone();
        flipped[HEADER + 2] ^= 1;
        assert_eq!(rx.clone_at(5).open(&mut flipped).unwrap_err().alert, alert::BAD_RECORD_MAC);

        let mut header_changed = good.clone();
        header_changed[1] = 0x01; // the header is authenticated data
        assert_eq!(rx.clone_at(5).open(&mut header_changed).unwrap_err().alert, alert::BAD_RECORD_MAC);

        let mut plain = good.clone();
        plain[0] = HANDSHAKE;
        assert_eq!(rx.clone_at(5).open(&mut plain).unwrap_err().alert, alert::UNEXPECTED_MESSAGE);

        let mut huge = vec![APPLICATION_DATA, 3, 3, 0x41, 0x01];
        huge.resize(HEADER + 0x4101, 0);
        assert_eq!(rx.clone_at(5).open(&mut huge).unwrap_err().alert, alert::RECORD_OVERFLOW);

        let mut tiny = vec![APPLICATION_DATA, 3, 3, 0, 4, 1, 2, 3, 4];
        assert_eq!(rx.clone_at(5).open(&mut tiny).unwrap_err().alert, alert::BAD_RECORD_MAC);

        assert_eq!(rx.clone_at(5).open(&mut [23, 3]).unwrap_err().alert, alert::DECODE_ERROR);

        // All padding, no content type.
        let mut padded = vec![0u8; HEADER];
        padded.extend_from_slice(&[0, 0, 0]);
        let mut k = tx.clone_at(9);
        let nonce = k.next_nonce().unwrap();
        let header = record_header(3 + TAG);
        padded[..HEADER].copy_from_slice(&header);
        let tag = k.key.seal_in_place_separate_tag(nonce, Aad::from(header), &mut padded[HEADER..]).unwrap();
        padded.extend_from_slice(tag.as_ref());
        assert_eq!(rx.clone_at(9).open(&mut padded).unwrap_err().alert, alert::UNEXPECTED_MESSAGE);

        // Untouched, it still opens.
        let mut r = good;
        assert!(rx.open(&mut r).is_ok());
    }

    #[test]
    fn padding_is_stripped_and_oversized_content_refused() {
        let (tx, rx) = key_pair();
        for (content_len, padding, ok) in [(10, 40, true), (MAX_PLAINTEXT, 200, true), (MAX_PLAINTEXT + 1, 0, false)] {
            let mut k = tx.clone_at(0);
            let mut buf = vec![0u8; HEADER];
            buf.extend(std::iter::repeat_n(0xAB, content_len));
            buf.push(APPLICATION_DATA);
            buf.extend(std::iter::repeat_n(0, padding));
            let header = record_header(buf.len() - HEADER + TAG);
            buf[..HEADER].copy_from_slice(&header);
            let nonce = k.next_nonce().unwrap();
            let tag = k.key.seal_in_place_separate_tag(nonce, Aad::from(header), &mut buf[HEADER..]).unwrap();
            buf.extend_from_slice(tag.as_ref());
            let res = rx.clone_at(0).open(&mut buf);
            if ok {
                let (typ, range) = res.unwrap();
                assert_eq!((typ, range.len()), (APPLICATION_DATA, content_len));
            } else {
                assert_eq!(res.unwrap_err().alert, alert::RECORD_OVERFLOW);
            }
        }
    }

    #[test]
    fn an_exhausted_sequence_is_an_error_not_a_wrap() {
        let (tx, _) = key_pair();
        let mut k = tx.clone_at(u64::MAX - 1);
        let mut buf = vec![0u8; HEADER];
        assert!(k.seal(&mut buf, 0, APPLICATION_DATA).is_ok());
        let mut buf = vec![0u8; HEADER];
        assert_eq!(k.seal(&mut buf, 0, APPLICATION_DATA).unwrap_err().alert, alert::INTERNAL_ERROR);
    }

    impl RecordKey {
        fn clone_at(&self, seq: u64) -> RecordKey {
            RecordKey { key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap()), iv: self.iv, seq }
        }
    }
}
