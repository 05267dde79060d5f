//! SPDY/3.1 framing as the Kubernetes streaming protocols use it: kubelet (and `kubectl`
//! through the API server) reach a container runtime's streaming server for exec, attach
//! and port-forward over an HTTP/1.1 connection upgraded to `SPDY/3.1`, one SPDY stream
//! per channel (stdin, stdout, stderr, error, resize; data and error per forwarded
//! connection). Used by auraed's CRI streaming server and by the test clients.
//!
//! Only what those protocols use: frames are read and written whole; header blocks share
//! one zlib stream per direction with SPDY/3's dictionary; no flow control is enforced
//! (Kubernetes' SPDY peers send no WINDOW_UPDATE). Everything read is bounded: a frame
//! at most [`MAX_FRAME`] bytes, a header block at most [`MAX_HEADER_BLOCK`] once
//! inflated, at most [`MAX_HEADERS`] pairs.

use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The `Upgrade` token of the connection.
pub const UPGRADE: &str = "SPDY/3.1";
/// FIN: the sender's last frame on this stream.
pub const FLAG_FIN: u8 = 0x01;
/// Largest frame accepted (Kubernetes' peers copy in 32 KiB writes).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest header block once inflated.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Most name/value pairs in one header block.
pub const MAX_HEADERS: usize = 256;
/// The largest data frame this side writes.
pub const DATA_CHUNK: usize = 32 << 10;

const VERSION: u16 = 3;

/// SPDY/3's header compression dictionary (draft 3, section 2.6.10.1): 1423 bytes,
/// Adler-32 `0xe3c6a7c2` (checked by a test).
#[rustfmt::skip]
pub const DICTIONARY: &[u8; 1423] = b"\
    \0\0\0\x07options\0\0\0\x04head\0\0\0\x04post\0\0\0\x03put\0\0\0\x06delete\0\0\0\x05tr\
    ace\0\0\0\x06accept\0\0\0\x0eaccept-charset\0\0\0\x0faccept-encoding\0\0\0\x0faccept-l\
    anguage\0\0\0\raccept-ranges\0\0\0\x03age\0\0\0\x05allow\0\0\0\rauthorization\0\0\0\rc\
    ache-control\0\0\0\nconnection\0\0\0\x0ccontent-base\0\0\0\x10content-encoding\0\0\0\
    \x10content-language\0\0\0\x0econtent-length\0\0\0\x10content-location\0\0\0\x0bconten\
    t-md5\0\0\0\rcontent-range\0\0\0\x0ccontent-type\0\0\0\x04date\0\0\0\x04etag\0\0\0\x06\
    expect\0\0\0\x07expires\0\0\0\x04from\0\0\0\x04host\0\0\0\x08if-match\0\0\0\x11if-modi\
    fied-since\0\0\0\rif-none-match\0\0\0\x08if-range\0\0\0\x13if-unmodified-since\0\0\0\r\
    last-modified\0\0\0\x08location\0\0\0\x0cmax-forwards\0\0\0\x06pragma\0\0\0\x12proxy-a\
    uthenticate\0\0\0\x13proxy-authorization\0\0\0\x05range\0\0\0\x07referer\0\0\0\x0bretr\
    y-after\0\0\0\x06server\0\0\0\x02te\0\0\0\x07trailer\0\0\0\x11transfer-encoding\0\0\0\
    \x07upgrade\0\0\0\nuser-agent\0\0\0\x04vary\0\0\0\x03via\0\0\0\x07warning\0\0\0\x10www\
    -authenticate\0\0\0\x06method\0\0\0\x03get\0\0\0\x06status\0\0\0\x06200 OK\0\0\0\x07ve\
    rsion\0\0\0\x08HTTP/1.1\0\0\0\x03url\0\0\0\x06public\0\0\0\nset-cookie\0\0\0\nkeep-ali\
    ve\0\0\0\x06origin10010120120220520630030230330430530630740240540640740840941041141241\
    3414415416417502504505203 Non-Authoritative Information204 No Content301 Moved Permane\
    ntly400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error\
    501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov\
    \x20Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,ima\
    ge/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publ\
    icprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.\
";

/// A header block: names lower-case, values as sent (several values NUL-separated).
pub type Headers = Vec<(String, String)>;

/// The first value of `name` (compared case-insensitively).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split('\0').next().unwrap_or_default())
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream: u32,
        associated: u32,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Settings,
    Ping {
        id: u32,
    },
    GoAway {
        last_stream: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    Data {
        stream: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// A control frame of a type this side does not use (skipped).
    Other {
        kind: u16,
    },
}

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn u32_at(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| bad("SPDY control frame too short"))
}

/// Reads frames; inflates header blocks with the connection's one zlib stream.
pub struct FrameReader<R> {
    r: R,
    inflate: Decompress,
}

impl<R> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("inflated", &self.inflate.total_out())
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        Self {
            r,
            inflate: Decompress::new(true),
        }
    }

    /// The next frame; `None` at a clean end of the connection (between frames).
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        match self.r.read_exact(&mut head[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        self.r.read_exact(&mut head[1..]).await?;
        let w0 = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            return Err(bad(format!(
                "SPDY frame of {len} bytes (at most {MAX_FRAME})"
            )));
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).await?;
        if w0 & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream: w0 & 0x7fff_ffff,
                flags,
                data: body,
            }));
        }
        let version = ((w0 >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(bad(format!("SPDY version {version} (this side speaks 3)")));
        }
        let kind = (w0 & 0xffff) as u16;
        let stream = |at| u32_at(&body, at).map(|v| v & 0x7fff_ffff);
        Ok(Some(match kind {
            1 => {
                let headers = self.headers(body.get(10..).unwrap_or_default())?;
                Frame::SynStream {
                    stream: stream(0)?,
                    associated: stream(4)?,
                    flags,
                    headers,
                }
            }
            2 => Frame::SynReply {
                stream: stream(0)?,
                flags,
                headers: self.headers(body.get(4..).unwrap_or_default())?,
            },
            3 => Frame::RstStream {
                stream: stream(0)?,
                status: u32_at(&body, 4)?,
            },
            4 => Frame::Settings,
            6 => Frame::Ping {
                id: u32_at(&body, 0)?,
            },
            7 => Frame::GoAway {
                last_stream: stream(0)?,
                status: u32_at(&body, 4).unwrap_or(0),
            },
            8 => Frame::Headers {
                stream: stream(0)?,
                flags,
                headers: self.headers(body.get(4..).unwrap_or_default())?,
            },
            9 => Frame::WindowUpdate {
                stream: stream(0)?,
                delta: u32_at(&body, 4)? & 0x7fff_ffff,
            },
            kind => Frame::Other { kind },
        }))
    }

    /// Inflates and parses one header block (every block continues the same zlib stream,
    /// so each must be read, in order, even when its frame is then refused).
    fn headers(&mut self, mut input: &[u8]) -> io::Result<Headers> {
        let mut out = Vec::with_capacity(256);
        while !input.is_empty() {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad(format!(
                        "SPDY header block over {MAX_HEADER_BLOCK} bytes inflated"
                    )));
                }
                out.reserve(out.len());
            }
            let before = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = usize::try_from(self.inflate.total_in() - before).unwrap_or(usize::MAX);
            input = input.get(used..).unwrap_or_default();
            match r {
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) => break,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| bad(format!("SPDY header dictionary: {e}")))?;
                }
                Err(e) => return Err(bad(format!("SPDY header block: {e}"))),
            }
        }
        parse_headers(&out)
    }
}

fn parse_headers(b: &[u8]) -> io::Result<Headers> {
    let count = u32_at(b, 0)? as usize;
    if count > MAX_HEADERS {
        return Err(bad(format!("{count} SPDY headers (at most {MAX_HEADERS})")));
    }
    let mut at = 4;
    let field = |at: &mut usize| -> io::Result<String> {
        let n = u32_at(b, *at)? as usize;
        let s = b
            .get(*at + 4..*at + 4 + n)
            .ok_or_else(|| bad("SPDY header block cut short"))?;
        *at += 4 + n;
        String::from_utf8(s.to_vec()).map_err(|_| bad("SPDY header is not UTF-8"))
    };
    let mut h = Vec::with_capacity(count);
    for _ in 0..count {
        let name = field(&mut at)?.to_ascii_lowercase();
        let value = field(&mut at)?;
        h.push((name, value));
    }
    Ok(h)
}

/// Writes frames; deflates header blocks with the connection's one zlib stream.
pub struct FrameWriter<W> {
    w: W,
    deflate: Compress,
}

impl<W> std::fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter")
            .field("deflated", &self.deflate.total_in())
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> io::Result<Self> {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(DICTIONARY)
            .map_err(|e| bad(format!("SPDY header dictionary: {e}")))?;
        Ok(Self { w, deflate })
    }

    fn block(&mut self, h: &Headers) -> io::Result<Vec<u8>> {
        let mut plain = Vec::new();
        plain.extend_from_slice(&(h.len() as u32).to_be_bytes());
        for (n, v) in h {
            for s in [n.to_ascii_lowercase().as_bytes(), v.as_bytes()] {
                plain.extend_from_slice(&(s.len() as u32).to_be_bytes());
                plain.extend_from_slice(s);
            }
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = plain.as_slice();
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| bad(format!("SPDY header block: {e}")))?;
            let used = usize::try_from(self.deflate.total_in() - before).unwrap_or(usize::MAX);
            input = input.get(used..).unwrap_or_default();
            // Done when all is in and the flush left room to spare (nothing pending).
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    fn control(kind: u16, flags: u8, body: &[u8]) -> io::Result<Vec<u8>> {
        if body.len() > 0xff_ffff {
            return Err(bad("SPDY frame too long"));
        }
        let mut f = Vec::with_capacity(8 + body.len());
        f.extend_from_slice(
            &(0x8000_0000u32 | (u32::from(VERSION) << 16) | u32::from(kind)).to_be_bytes(),
        );
        f.extend_from_slice(&((u32::from(flags) << 24) | body.len() as u32).to_be_bytes());
        f.extend_from_slice(body);
        Ok(f)
    }

    /// Encodes `f` (header blocks through the connection's zlib stream, so frames must be
    /// sent in the order they are encoded).
    pub fn encode(&mut self, f: &Frame) -> io::Result<Vec<u8>> {
        let id = |s: u32| (s & 0x7fff_ffff).to_be_bytes();
        match f {
            Frame::SynStream {
                stream,
                associated,
                flags,
                headers,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&id(*stream));
                b.extend_from_slice(&id(*associated));
                b.extend_from_slice(&[0, 0]);
                b.extend(self.block(headers)?);
                Self::control(1, *flags, &b)
            }
            Frame::SynReply {
                stream,
                flags,
                headers,
            } => {
                let mut b = id(*stream).to_vec();
                b.extend(self.block(headers)?);
                Self::control(2, *flags, &b)
            }
            Frame::Headers {
                stream,
                flags,
                headers,
            } => {
                let mut b = id(*stream).to_vec();
                b.extend(self.block(headers)?);
                Self::control(8, *flags, &b)
            }
            Frame::RstStream { stream, status } => {
                let mut b = id(*stream).to_vec();
                b.extend_from_slice(&status.to_be_bytes());
                Self::control(3, 0, &b)
            }
            Frame::Settings => Self::control(4, 0, &0u32.to_be_bytes()),
            Frame::Ping { id: p } => Self::control(6, 0, &p.to_be_bytes()),
            Frame::GoAway {
                last_stream,
                status,
            } => {
                let mut b = id(*last_stream).to_vec();
                b.extend_from_slice(&status.to_be_bytes());
                Self::control(7, 0, &b)
            }
            Frame::WindowUpdate { stream, delta } => {
                let mut b = id(*stream).to_vec();
                b.extend_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
                Self::control(9, 0, &b)
            }
            Frame::Data {
                stream,
                flags,
                data,
            } => {
                if data.len() > 0xff_ffff {
                    return Err(bad("SPDY data frame too long"));
                }
                let mut f = Vec::with_capacity(8 + data.len());
                f.extend_from_slice(&id(*stream));
                f.extend_from_slice(&((u32::from(*flags) << 24) | data.len() as u32).to_be_bytes());
                f.extend_from_slice(data);
                Ok(f)
            }
            Frame::Other { kind } => Err(bad(format!("cannot send SPDY frame type {kind}"))),
        }
    }

    /// Encodes and writes `f`, flushed.
    pub async fn send(&mut self, f: &Frame) -> io::Result<()> {
        let b = self.encode(f)?;
        self.w.write_all(&b).await?;
        self.w.flush().await
    }

    /// The underlying writer (to shut it down).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        let mut c = Compress::new(Compression::default(), true);
        assert_eq!(c.set_dictionary(DICTIONARY).unwrap(), 0xe3c6_a7c2);
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[tokio::test]
    async fn frames_round_trip_and_header_blocks_share_one_stream() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a).unwrap();
        let mut r = FrameReader::new(b);
        let frames = vec![
            Frame::SynStream {
                stream: 1,
                associated: 0,
                flags: 0,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("port".into(), "8080".into()),
                ],
            },
            Frame::SynStream {
                stream: 3,
                associated: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "stdout".into())],
            },
            Frame::SynReply {
                stream: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Data {
                stream: 3,
                flags: FLAG_FIN,
                data: vec![7; 40_000],
            },
            Frame::Ping { id: 9 },
            Frame::RstStream {
                stream: 3,
                status: rst::CANCEL,
            },
            Frame::WindowUpdate {
                stream: 1,
                delta: 5,
            },
            Frame::GoAway {
                last_stream: 3,
                status: 0,
            },
        ];
        for f in &frames {
            w.send(f).await.unwrap();
        }
        drop(w);
        for f in &frames {
            assert_eq!(r.next().await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(r.next().await.unwrap(), None);
        assert_eq!(
            header(&vec![("StreamType".into(), "data\0x".into())], "streamtype"),
            Some("data")
        );
    }

    /// Two SYN_STREAMs as C zlib writes them (Python's `zlib.compressobj(zdict=…)` with
    /// a sync flush after each block, as Go's SPDY framer does): the second block's
    /// back-references reach into the first.
    #[tokio::test]
    async fn header_blocks_from_another_zlib_are_read() {
        const FROM_C_ZLIB: [u8; 101] = [
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3d, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x70,
            0x3a, 0x2b, 0x29, 0x4a, 0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x86,
            0x14, 0xcb, 0x45, 0xe0, 0x1c, 0x60, 0x61, 0x60, 0x61, 0x00, 0xa4, 0x39, 0x8b, 0x20,
            0xd1, 0x98, 0x09, 0x4a, 0xde, 0x8c, 0x06, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x80,
            0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0xc2, 0xaa, 0x19, 0x54, 0x0e, 0x25, 0x12, 0xd6, 0x0b, 0x00, 0x00,
            0x00, 0xff, 0xff,
        ];
        let mut r = FrameReader::new(&FROM_C_ZLIB[..]);
        let h = |t: &str| -> Headers {
            vec![
                ("streamtype".into(), t.into()),
                ("port".into(), "8080".into()),
                ("requestid".into(), "0".into()),
            ]
        };
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::SynStream {
                stream: 1,
                associated: 0,
                flags: 0,
                headers: h("error"),
            })
        );
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::SynStream {
                stream: 3,
                associated: 0,
                flags: 0,
                headers: h("data"),
            })
        );
    }

    #[tokio::test]
    async fn what_is_read_is_bounded() {
        // A frame claiming 16 MiB.
        let mut r = FrameReader::new(&[0u8, 0, 0, 1, 0, 0xff, 0xff, 0xff][..]);
        assert!(r.next().await.is_err());
        // Another version.
        let mut r = FrameReader::new(&[0x80u8, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert!(
            r.next()
                .await
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        // A header block that inflates past its bound (a zlib bomb).
        let mut w = FrameWriter::new(Vec::new()).unwrap();
        let f = w
            .encode(&Frame::SynReply {
                stream: 1,
                flags: 0,
                headers: vec![("x".into(), "a".repeat(MAX_HEADER_BLOCK))],
            })
            .unwrap();
        assert!(f.len() < 4096, "it compresses well: {}", f.len());
        let mut r = FrameReader::new(f.as_slice());
        assert!(r.next().await.unwrap_err().to_string().contains("inflated"));
        // A count of pairs larger than the block.
        let mut w = FrameWriter::new(Vec::new()).unwrap();
        let mut f = w
            .encode(&Frame::SynReply {
                stream: 1,
                flags: 0,
                headers: vec![],
            })
            .unwrap();
        f.truncate(8);
        let mut r = FrameReader::new(f.as_slice());
        assert!(r.next().await.is_err(), "a frame cut short");
    }
}
