//! The two compressions an NSQ connection can upgrade to after IDENTIFY, without I/O.
//!
//! - Snappy, in the snappy *framing format* (what golang/snappy's framed reader and writer and
//!   npm's `snappystream` speak): a stream identifier chunk, then chunks of at most 64 KiB of
//!   data, each compressed or stored and carrying a masked CRC-32C of the data.
//! - Raw deflate (no zlib header, as Go's `compress/flate`), with a sync flush after every write
//!   so the peer can decode everything sent so far.
//!
//! [`Compressor`] turns what the server (or a client) writes into compressed bytes;
//! [`Decompressor`] takes compressed bytes as they arrive, split anywhere, and gives back the
//! original bytes in bounded steps.

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use snap::raw::{Decoder as RawDecoder, Encoder as RawEncoder, decompress_len, max_compress_len};

/// The snappy framing format's stream identifier chunk, byte for byte.
pub const SNAPPY_STREAM_IDENTIFIER: &[u8; 10] = b"\xff\x06\x00\x00sNaPpY";

/// The most data one snappy chunk may carry, before compression.
pub const SNAPPY_MAX_BLOCK: usize = 65536;

const CHUNK_HEADER_LEN: usize = 4;
const CHECKSUM_LEN: usize = 4;
const CHUNK_COMPRESSED: u8 = 0x00;
const CHUNK_UNCOMPRESSED: u8 = 0x01;
const CHUNK_STREAM_IDENTIFIER: u8 = 0xff;
const IDENTIFIER_BODY: &[u8] = b"sNaPpY";

/// How much inflated output one step asks for, so a small `limit` means a small buffer and a
/// huge one does not mean a huge zero-fill.
const INFLATE_STEP: usize = 64 * 1024;

/// The largest body a legal compressed chunk can have: a checksum and the worst-case
/// compression of a full block. Anything longer is rejected before it is buffered.
fn max_compressed_chunk() -> usize {
    CHECKSUM_LEN + max_compress_len(SNAPPY_MAX_BLOCK)
}

/// Why a compressed stream cannot be decoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CompressionError {
    #[error("snappy: stream does not start with the stream identifier")]
    SnappyMissingIdentifier,
    #[error("snappy: malformed stream identifier")]
    SnappyBadIdentifier,
    #[error("snappy: reserved chunk type 0x{0:02x}")]
    SnappyReservedChunk(u8),
    #[error("snappy: chunk of {len} bytes is too large")]
    SnappyChunkTooLarge { len: usize },
    #[error("snappy: chunk of {len} bytes is too short for its checksum")]
    SnappyChunkTooShort { len: usize },
    #[error("snappy: chunk decompresses to {len} bytes, more than 65536")]
    SnappyBlockTooLarge { len: usize },
    #[error("snappy: corrupt compressed chunk: {0}")]
    SnappyCorrupt(#[source] snap::Error),
    #[error("snappy: checksum mismatch")]
    SnappyChecksum,
    #[error("deflate: {0}")]
    Deflate(#[source] flate2::DecompressError),
    #[error("deflate: data after the end of the stream")]
    DeflateTrailingData,
}

/// The framing format's checksum: CRC-32C, rotated and offset so that a checksum of data that
/// itself contains checksums does not degenerate.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Compresses the outgoing direction of a connection.
pub struct Compressor {
    kind: CompressorKind,
}

enum CompressorKind {
    Snappy {
        // Boxed: its 2 KiB hash table would otherwise sit in every connection struct.
        encoder: Box<RawEncoder>,
        wrote_identifier: bool,
    },
    Deflate(Compress),
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            CompressorKind::Snappy { .. } => "snappy",
            CompressorKind::Deflate(_) => "deflate",
        };
        f.debug_struct("Compressor").field("kind", &kind).finish()
    }
}

impl Compressor {
    /// Snappy framing format.
    pub fn snappy() -> Compressor {
        Compressor {
            kind: CompressorKind::Snappy {
                encoder: Box::new(RawEncoder::new()),
                wrote_identifier: false,
            },
        }
    }

    /// Raw deflate at `level`, clamped to 1..=9.
    pub fn deflate(level: u32) -> Compressor {
        let level = Compression::new(level.clamp(1, 9));
        Compressor {
            kind: CompressorKind::Deflate(Compress::new(level, false)),
        }
    }

    /// Compresses `input` and appends it to `out`, flushed so the peer can decode every byte of
    /// `input` from `out` alone (snappy: whole chunks, the stream identifier before the first;
    /// deflate: a sync flush). Empty input appends nothing.
    pub fn compress(&mut self, input: &[u8], out: &mut BytesMut) {
        if input.is_empty() {
            return;
        }
        match &mut self.kind {
            CompressorKind::Snappy {
                encoder,
                wrote_identifier,
            } => {
                if !*wrote_identifier {
                    out.extend_from_slice(SNAPPY_STREAM_IDENTIFIER);
                    *wrote_identifier = true;
                }
                for block in input.chunks(SNAPPY_MAX_BLOCK) {
                    snappy_chunk(encoder, block, out);
                }
            }
            CompressorKind::Deflate(deflate) => deflate_sync(deflate, input, out),
        }
    }
}

/// Appends one chunk holding `block` (at most [`SNAPPY_MAX_BLOCK`] bytes).
fn snappy_chunk(encoder: &mut RawEncoder, block: &[u8], out: &mut BytesMut) {
    let start = out.len();
    let body = start + CHUNK_HEADER_LEN + CHECKSUM_LEN;
    // Compress straight into `out`; the zero fill is cheaper than a second copy.
    out.resize(body + max_compress_len(block.len()), 0);
    // Like golang/snappy, store the block as is unless compression saves at least 1/8: reading
    // a stored chunk costs the peer only a checksum.
    let saves_enough = |n: &usize| *n < block.len() - block.len() / 8;
    let compressed = encoder
        .compress(block, &mut out[body..])
        .ok()
        .filter(saves_enough);
    let (chunk_type, data_len) = match compressed {
        Some(n) => {
            out.truncate(body + n);
            (CHUNK_COMPRESSED, n)
        }
        None => {
            out.truncate(body);
            out.extend_from_slice(block);
            (CHUNK_UNCOMPRESSED, block.len())
        }
    };
    let chunk_len = u32::try_from(CHECKSUM_LEN + data_len).unwrap_or(u32::MAX);
    out[start] = chunk_type;
    out[start + 1..start + 4].copy_from_slice(&chunk_len.to_le_bytes()[..3]);
    out[start + 4..body].copy_from_slice(&masked_crc(block).to_le_bytes());
}

/// Deflates `input` into `out` and ends with a sync flush (an empty stored block), so the
/// output ends on a byte boundary with nothing held back.
fn deflate_sync(deflate: &mut Compress, input: &[u8], out: &mut BytesMut) {
    let mut rest = input;
    loop {
        // Deflate rarely expands by more than a few bytes per 16 KiB; the flush adds 5.
        let room = rest.len() + rest.len() / 16 + 64;
        let start = out.len();
        out.resize(start + room, 0);
        let (in_before, out_before) = (deflate.total_in(), deflate.total_out());
        let result = deflate.compress(rest, &mut out[start..], FlushCompress::Sync);
        let consumed = usize::try_from(deflate.total_in() - in_before).unwrap_or(rest.len());
        let produced = usize::try_from(deflate.total_out() - out_before).unwrap_or(room);
        out.truncate(start + produced);
        rest = &rest[consumed.min(rest.len())..];
        // The flush is complete once deflate stops short of filling the room it was given. An
        // error only comes from misuse (never here); stopping beats spinning.
        let stalled = consumed == 0 && produced == 0;
        if result.is_err() || stalled || (rest.is_empty() && produced < room) {
            break;
        }
    }
}

/// Decompresses the incoming direction of a connection.
pub struct Decompressor {
    /// Fed bytes not yet decompressed.
    pending: BytesMut,
    /// The first error, returned again by every later call: a stream that went wrong once
    /// cannot be resynchronised.
    failed: Option<CompressionError>,
    kind: DecompressorKind,
}

enum DecompressorKind {
    Snappy {
        decoder: RawDecoder,
        seen_identifier: bool,
        /// Bytes of a skippable chunk still to drop; skipped as they arrive, never buffered.
        skipping: usize,
    },
    Deflate {
        inflate: Decompress,
        /// The last step filled its output, so inflate may hold more even with no input left.
        more_output: bool,
        ended: bool,
    },
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DecompressorKind::Snappy { .. } => "snappy",
            DecompressorKind::Deflate { .. } => "deflate",
        };
        f.debug_struct("Decompressor")
            .field("kind", &kind)
            .field("pending", &self.pending.len())
            .field("failed", &self.failed)
            .finish()
    }
}

/// What a snappy chunk header asks the decoder to do.
enum ChunkPlan {
    /// Wait for (or process) a body of this length.
    Body { chunk_type: u8, len: usize },
    /// Drop this many bytes.
    Skip(usize),
}

/// Checks a snappy chunk header before its body is buffered, so a bad or oversized chunk fails
/// at once instead of being waited for.
fn plan_chunk(header: &[u8], seen_identifier: bool) -> Result<ChunkPlan, CompressionError> {
    let chunk_type = header[0];
    let len = usize::from(header[1]) | usize::from(header[2]) << 8 | usize::from(header[3]) << 16;
    if chunk_type == CHUNK_STREAM_IDENTIFIER {
        if len != IDENTIFIER_BODY.len() {
            return Err(CompressionError::SnappyBadIdentifier);
        }
        return Ok(ChunkPlan::Body { chunk_type, len });
    }
    if !seen_identifier {
        return Err(CompressionError::SnappyMissingIdentifier);
    }
    let max = match chunk_type {
        CHUNK_COMPRESSED => max_compressed_chunk(),
        CHUNK_UNCOMPRESSED => CHECKSUM_LEN + SNAPPY_MAX_BLOCK,
        0x02..=0x7f => return Err(CompressionError::SnappyReservedChunk(chunk_type)),
        // 0x80..=0xfd are skippable, 0xfe is padding: both are dropped unread.
        _ => return Ok(ChunkPlan::Skip(len)),
    };
    if len > max {
        return Err(CompressionError::SnappyChunkTooLarge { len });
    }
    if len < CHECKSUM_LEN {
        return Err(CompressionError::SnappyChunkTooShort { len });
    }
    Ok(ChunkPlan::Body { chunk_type, len })
}

impl Decompressor {
    /// Snappy framing format.
    pub fn snappy() -> Decompressor {
        Decompressor::new(DecompressorKind::Snappy {
            decoder: RawDecoder::new(),
            seen_identifier: false,
            skipping: 0,
        })
    }

    /// Raw deflate.
    pub fn deflate() -> Decompressor {
        Decompressor::new(DecompressorKind::Deflate {
            inflate: Decompress::new(false),
            more_output: false,
            ended: false,
        })
    }

    fn new(kind: DecompressorKind) -> Decompressor {
        Decompressor {
            pending: BytesMut::new(),
            failed: None,
            kind,
        }
    }

    /// Takes compressed bytes as they arrive, split anywhere.
    pub fn feed(&mut self, input: &[u8]) {
        if let DecompressorKind::Snappy { skipping, .. } = &mut self.kind
            && *skipping > 0
            && self.pending.is_empty()
        {
            // Drop skippable bytes on arrival rather than buffering a chunk of up to 16 MiB.
            let n = (*skipping).min(input.len());
            *skipping -= n;
            self.pending.extend_from_slice(&input[n..]);
            return;
        }
        self.pending.extend_from_slice(input);
    }

    /// Appends decompressed bytes to `out`: stops once it has appended at least `limit` bytes
    /// (snappy may exceed it by up to one chunk, 65536) so a small input that expands
    /// 1000-fold is taken in steps; returns how many bytes were appended; `Ok(0)` means more
    /// input is needed. A corrupt stream is an `Err`, and every later call returns an `Err`
    /// too. A `limit` of 0 is taken as 1.
    pub fn decompress(
        &mut self,
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<usize, CompressionError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let limit = limit.max(1);
        let result = match &mut self.kind {
            DecompressorKind::Snappy {
                decoder,
                seen_identifier,
                skipping,
            } => snappy_decode(
                &mut self.pending,
                decoder,
                seen_identifier,
                skipping,
                out,
                limit,
            ),
            DecompressorKind::Deflate {
                inflate,
                more_output,
                ended,
            } => inflate_steps(&mut self.pending, inflate, more_output, ended, out, limit),
        };
        if let Err(err) = &result {
            self.failed = Some(err.clone());
            self.pending = BytesMut::new();
        }
        result
    }

    /// Whether fed input is still waiting to be decompressed (call `decompress` again before
    /// reading more). False while only part of a snappy chunk has arrived: `decompress` could
    /// not make progress on it.
    pub fn has_pending(&self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        match &self.kind {
            DecompressorKind::Snappy {
                seen_identifier,
                skipping,
                ..
            } => {
                if *skipping > 0 || self.pending.len() < CHUNK_HEADER_LEN {
                    return *skipping > 0 && !self.pending.is_empty();
                }
                match plan_chunk(&self.pending[..CHUNK_HEADER_LEN], *seen_identifier) {
                    Ok(ChunkPlan::Body { len, .. }) => self.pending.len() >= CHUNK_HEADER_LEN + len,
                    // Skipping a header is progress, and an error is worth reporting.
                    Ok(ChunkPlan::Skip(_)) | Err(_) => true,
                }
            }
            DecompressorKind::Deflate { more_output, .. } => {
                *more_output || !self.pending.is_empty()
            }
        }
    }
}

fn snappy_decode(
    pending: &mut BytesMut,
    decoder: &mut RawDecoder,
    seen_identifier: &mut bool,
    skipping: &mut usize,
    out: &mut BytesMut,
    limit: usize,
) -> Result<usize, CompressionError> {
    let mut appended = 0;
    while appended < limit {
        if *skipping > 0 {
            let n = (*skipping).min(pending.len());
            pending.advance(n);
            *skipping -= n;
            if *skipping > 0 {
                break;
            }
            continue;
        }
        if pending.len() < CHUNK_HEADER_LEN {
            break;
        }
        let (chunk_type, len) = match plan_chunk(&pending[..CHUNK_HEADER_LEN], *seen_identifier)? {
            ChunkPlan::Skip(len) => {
                pending.advance(CHUNK_HEADER_LEN);
                *skipping = len;
                continue;
            }
            ChunkPlan::Body { chunk_type, len } => (chunk_type, len),
        };
        if pending.len() < CHUNK_HEADER_LEN + len {
            break;
        }
        let body = &pending[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + len];
        match chunk_type {
            CHUNK_STREAM_IDENTIFIER => {
                if body != IDENTIFIER_BODY {
                    return Err(CompressionError::SnappyBadIdentifier);
                }
                *seen_identifier = true;
            }
            _ => {
                let (crc, data) = body.split_at(CHECKSUM_LEN);
                let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
                let start = out.len();
                if chunk_type == CHUNK_COMPRESSED {
                    let n = decompress_len(data).map_err(CompressionError::SnappyCorrupt)?;
                    if n > SNAPPY_MAX_BLOCK {
                        return Err(CompressionError::SnappyBlockTooLarge { len: n });
                    }
                    out.resize(start + n, 0);
                    if let Err(err) = decoder.decompress(data, &mut out[start..]) {
                        out.truncate(start);
                        return Err(CompressionError::SnappyCorrupt(err));
                    }
                } else {
                    out.extend_from_slice(data);
                }
                if masked_crc(&out[start..]) != crc {
                    out.truncate(start);
                    return Err(CompressionError::SnappyChecksum);
                }
                appended += out.len() - start;
            }
        }
        pending.advance(CHUNK_HEADER_LEN + len);
    }
    Ok(appended)
}

fn inflate_steps(
    pending: &mut BytesMut,
    inflate: &mut Decompress,
    more_output: &mut bool,
    ended: &mut bool,
    out: &mut BytesMut,
    limit: usize,
) -> Result<usize, CompressionError> {
    if *ended {
        return if pending.is_empty() {
            Ok(0)
        } else {
            Err(CompressionError::DeflateTrailingData)
        };
    }
    let mut appended = 0;
    while appended < limit {
        let step = (limit - appended).min(INFLATE_STEP);
        let start = out.len();
        out.resize(start + step, 0);
        let (in_before, out_before) = (inflate.total_in(), inflate.total_out());
        let result = inflate.decompress(pending, &mut out[start..], FlushDecompress::None);
        let consumed = usize::try_from(inflate.total_in() - in_before).unwrap_or(pending.len());
        let produced = usize::try_from(inflate.total_out() - out_before).unwrap_or(step);
        out.truncate(start + produced);
        pending.advance(consumed.min(pending.len()));
        appended += produced;
        match result.map_err(CompressionError::Deflate)? {
            Status::StreamEnd => {
                *ended = true;
                *more_output = false;
                if !pending.is_empty() {
                    return Err(CompressionError::DeflateTrailingData);
                }
                break;
            }
            // Inflate stops short of a full output only when it has used all its input.
            _ if produced < step => {
                *more_output = false;
                break;
            }
            _ => *more_output = true,
        }
    }
    Ok(appended)
}
