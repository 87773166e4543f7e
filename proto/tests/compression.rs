//! The compression codec: round trips split anywhere, agreement with independent snappy-framing
//! and deflate implementations, corrupt streams, and the output limit.
#![cfg(feature = "compression")]

use std::io::{Read, Write};

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use proto::wire::compression::{
    CompressionError, Compressor, Decompressor, SNAPPY_MAX_BLOCK, SNAPPY_STREAM_IDENTIFIER,
};

// ---------------------------------------------------------------------------------------
// Helpers

/// Decompresses everything the decoder can with what it has been fed.
fn drain(dec: &mut Decompressor, out: &mut BytesMut) -> Result<(), CompressionError> {
    loop {
        let n = dec.decompress(out, 64 * 1024)?;
        if n == 0 && !dec.has_pending() {
            return Ok(());
        }
    }
}

/// Feeds `input` cut at `cuts` (positions taken modulo its length), draining after each piece.
fn feed_split(dec: &mut Decompressor, input: &[u8], cuts: &[usize], out: &mut BytesMut) {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.push(0);
    cuts.push(input.len());
    cuts.sort_unstable();
    for pair in cuts.windows(2) {
        dec.feed(&input[pair[0]..pair[1]]);
        drain(dec, out).expect("valid stream");
    }
}

fn compress_all(mut comp: Compressor, input: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    comp.compress(input, &mut out);
    out
}

fn decompress_all(mut dec: Decompressor, input: &[u8]) -> Result<Vec<u8>, CompressionError> {
    let mut out = BytesMut::new();
    dec.feed(input);
    drain(&mut dec, &mut out)?;
    Ok(out.to_vec())
}

/// Text-like data that compresses, with a little variation so it is not trivial.
fn compressible(len: usize) -> Vec<u8> {
    let words: [&[u8]; 5] = [b"topic ", b"channel ", b"message ", b"nsq ", b"0123456789 "];
    let mut data = Vec::with_capacity(len);
    let mut i = 0usize;
    while data.len() < len {
        data.extend_from_slice(words[(i * 7 + i / 3) % words.len()]);
        i += 1;
    }
    data.truncate(len);
    data
}

/// Bytes that do not compress (a xorshift sequence).
fn incompressible(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The chunks of a snappy stream: (type, body length).
fn snappy_chunks(stream: &[u8]) -> Vec<(u8, usize)> {
    let mut chunks = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let len = usize::from(rest[1]) | usize::from(rest[2]) << 8 | usize::from(rest[3]) << 16;
        chunks.push((rest[0], len));
        rest = &rest[4 + len..];
    }
    chunks
}

fn snappy_stream(chunks: &[&[u8]]) -> Vec<u8> {
    let mut stream = SNAPPY_STREAM_IDENTIFIER.to_vec();
    for chunk in chunks {
        stream.extend_from_slice(chunk);
    }
    stream
}

// ---------------------------------------------------------------------------------------
// Round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every write is decodable from its own output (the flush), whatever the cuts.
    #[test]
    fn snappy_round_trip_split_anywhere(
        writes in vec(vec(any::<u8>(), 0..3000), 1..6),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        round_trip(Compressor::snappy(), Decompressor::snappy(), &writes, &cuts)?;
    }

    #[test]
    fn deflate_round_trip_split_anywhere(
        writes in vec(vec(any::<u8>(), 0..3000), 1..6),
        cuts in vec(any::<usize>(), 0..8),
        level in 0u32..12,
    ) {
        round_trip(Compressor::deflate(level), Decompressor::deflate(), &writes, &cuts)?;
    }

    #[test]
    fn compressible_round_trip_split_anywhere(
        lens in vec(0usize..200_000, 1..4),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let writes: Vec<Vec<u8>> = lens.iter().map(|&len| compressible(len)).collect();
        round_trip(Compressor::snappy(), Decompressor::snappy(), &writes, &cuts)?;
        round_trip(Compressor::deflate(6), Decompressor::deflate(), &writes, &cuts)?;
    }
}

fn round_trip(
    mut comp: Compressor,
    mut dec: Decompressor,
    writes: &[Vec<u8>],
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    let mut expected = Vec::new();
    let mut decoded = BytesMut::new();
    for write in writes {
        let mut wire = BytesMut::new();
        comp.compress(write, &mut wire);
        prop_assert_eq!(wire.is_empty(), write.is_empty());
        feed_split(&mut dec, &wire, cuts, &mut decoded);
        expected.extend_from_slice(write);
        prop_assert!(!dec.has_pending());
        prop_assert_eq!(&decoded[..], &expected[..]);
    }
    Ok(())
}

#[test]
fn snappy_stream_identifier_is_byte_exact_and_sent_once() {
    assert_eq!(
        SNAPPY_STREAM_IDENTIFIER,
        b"\xff\x06\x00\x00\x73\x4e\x61\x50\x70\x59"
    );
    let mut comp = Compressor::snappy();
    let mut out = BytesMut::new();
    comp.compress(b"OK", &mut out);
    assert_eq!(&out[..10], SNAPPY_STREAM_IDENTIFIER);
    let first = out.len();
    comp.compress(b"OK", &mut out);
    assert_ne!(&out[first..first + 10], SNAPPY_STREAM_IDENTIFIER);
    assert_eq!(snappy_chunks(&out).len(), 3);
}

#[test]
fn empty_input_appends_nothing() {
    for mut comp in [Compressor::snappy(), Compressor::deflate(6)] {
        let mut out = BytesMut::new();
        comp.compress(b"", &mut out);
        assert!(out.is_empty());
    }
}

#[test]
fn snappy_splits_large_input_into_chunks_of_at_most_64k() {
    for data in [compressible(300_000), incompressible(200_000)] {
        let wire = compress_all(Compressor::snappy(), &data);
        let chunks = snappy_chunks(&wire);
        assert_eq!(chunks[0], (0xff, 6));
        let data_chunks = &chunks[1..];
        assert_eq!(data_chunks.len(), data.len().div_ceil(SNAPPY_MAX_BLOCK));
        for &(kind, len) in data_chunks {
            assert!(kind == 0x00 || kind == 0x01, "chunk type {kind:#x}");
            assert!(len <= 4 + SNAPPY_MAX_BLOCK);
        }
        assert_eq!(decompress_all(Decompressor::snappy(), &wire).unwrap(), data);
    }
    // Incompressible data is stored, compressible data is compressed.
    let stored = compress_all(Compressor::snappy(), &incompressible(1000));
    assert_eq!(snappy_chunks(&stored)[1], (0x01, 1004));
    let packed = compress_all(Compressor::snappy(), &compressible(1000));
    assert_eq!(snappy_chunks(&packed)[1].0, 0x00);
}

#[test]
fn deflate_handles_large_incompressible_writes() {
    let data = incompressible(500_000);
    let wire = compress_all(Compressor::deflate(9), &data);
    assert_eq!(
        decompress_all(Decompressor::deflate(), &wire).unwrap(),
        data
    );
    // A sync flush ends with an empty stored block.
    assert_eq!(&wire[wire.len() - 4..], b"\x00\x00\xff\xff");
}

// ---------------------------------------------------------------------------------------
// Independent implementations

#[test]
fn snap_frame_decoder_reads_our_snappy() {
    let data = [compressible(150_000), incompressible(70_000), b"x".to_vec()];
    let mut comp = Compressor::snappy();
    let mut wire = BytesMut::new();
    for write in &data {
        comp.compress(write, &mut wire);
    }
    let mut decoded = Vec::new();
    snap::read::FrameDecoder::new(&wire[..])
        .read_to_end(&mut decoded)
        .unwrap();
    assert_eq!(decoded, data.concat());
}

#[test]
fn we_read_snap_frame_encoder_output() {
    let data = [compressible(150_000), incompressible(70_000), b"x".to_vec()].concat();
    let mut encoder = snap::write::FrameEncoder::new(Vec::new());
    encoder.write_all(&data).unwrap();
    let wire = encoder.into_inner().unwrap();
    let mut dec = Decompressor::snappy();
    let mut decoded = BytesMut::new();
    feed_split(&mut dec, &wire, &[1, 9, 10, 11, 5000, 70_000], &mut decoded);
    assert_eq!(&decoded[..], &data[..]);
}

#[test]
fn flate2_reads_our_deflate() {
    let data = [compressible(150_000), incompressible(70_000), b"x".to_vec()];
    let mut comp = Compressor::deflate(6);
    let mut wire = BytesMut::new();
    let mut inflater = flate2::read::DeflateDecoder::new(std::io::Cursor::new(Vec::new()));
    for write in &data {
        // Each write must be readable before the next exists: that is what the flush is for.
        let start = wire.len();
        comp.compress(write, &mut wire);
        inflater
            .get_mut()
            .get_mut()
            .extend_from_slice(&wire[start..]);
        let mut decoded = vec![0; write.len()];
        inflater.read_exact(&mut decoded).unwrap();
        assert_eq!(&decoded, write);
    }
}

#[test]
fn we_read_flate2_deflate_output() {
    let data = [compressible(150_000), incompressible(70_000)];
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(5));
    let mut dec = Decompressor::deflate();
    let mut decoded = BytesMut::new();
    for write in &data {
        encoder.write_all(write).unwrap();
        encoder.flush().unwrap();
        let wire = std::mem::take(encoder.get_mut());
        feed_split(&mut dec, &wire, &[3, 1000, 20_000], &mut decoded);
    }
    // A stream that ends properly is fine too; nothing may follow it.
    encoder.write_all(b"tail").unwrap();
    let end = encoder.finish().unwrap();
    feed_split(&mut dec, &end, &[1], &mut decoded);
    assert_eq!(
        &decoded[..],
        &[&data[0][..], &data[1][..], b"tail"].concat()[..]
    );
    dec.feed(b"more");
    let err = dec.decompress(&mut decoded, 100).unwrap_err();
    assert_eq!(err.to_string(), "deflate: data after the end of the stream");
}

// ---------------------------------------------------------------------------------------
// Corrupt streams

fn snappy_error(stream: &[u8]) -> String {
    let err = decompress_all(Decompressor::snappy(), stream).unwrap_err();
    err.to_string()
}

#[test]
fn snappy_bad_checksum_is_an_error_and_stays_one() {
    for data in [compressible(5000), incompressible(500)] {
        let mut wire = compress_all(Compressor::snappy(), &data);
        wire[10 + 4] ^= 0x01; // first checksum byte of the first data chunk
        let mut dec = Decompressor::snappy();
        dec.feed(&wire);
        let mut out = BytesMut::new();
        let err = dec.decompress(&mut out, 1 << 20).unwrap_err();
        assert_eq!(err.to_string(), "snappy: checksum mismatch");
        assert!(out.is_empty(), "nothing unverified is handed out");
        // Poisoned: even good input afterwards is refused.
        dec.feed(&compress_all(Compressor::snappy(), b"fine"));
        assert!(dec.decompress(&mut out, 1 << 20).is_err());
        assert!(!dec.has_pending());
    }
}

#[test]
fn snappy_reserved_chunk_types_are_errors() {
    for kind in [0x02u8, 0x03, 0x7f] {
        let stream = snappy_stream(&[&[kind, 1, 0, 0, 0]]);
        assert_eq!(
            snappy_error(&stream),
            format!("snappy: reserved chunk type 0x{kind:02x}")
        );
    }
}

#[test]
fn snappy_stream_must_start_with_the_identifier() {
    let wire = compress_all(Compressor::snappy(), b"hello");
    let expected = "snappy: stream does not start with the stream identifier";
    assert_eq!(snappy_error(&wire[10..]), expected);
    // Not even padding may come first.
    assert_eq!(snappy_error(&[0xfe, 0, 0, 0]), expected);
    assert_eq!(
        snappy_error(b"\xff\x06\x00\x00sNaPpZ"),
        "snappy: malformed stream identifier"
    );
    assert_eq!(
        snappy_error(b"\xff\x05\x00\x00sNaPp"),
        "snappy: malformed stream identifier"
    );
}

#[test]
fn snappy_oversized_chunk_fails_before_its_body_arrives() {
    let mut dec = Decompressor::snappy();
    dec.feed(SNAPPY_STREAM_IDENTIFIER);
    dec.feed(&[0x00, 0xff, 0xff, 0xff]);
    assert!(dec.has_pending(), "the header alone is enough to fail");
    let err = dec.decompress(&mut BytesMut::new(), 1024).unwrap_err();
    assert_eq!(
        err.to_string(),
        "snappy: chunk of 16777215 bytes is too large"
    );

    let stream = snappy_stream(&[&[0x01, 0x05, 0x00, 0x01]]); // 65541 > 4 + 65536
    assert_eq!(
        snappy_error(&stream),
        "snappy: chunk of 65541 bytes is too large"
    );
    let stream = snappy_stream(&[&[0x00, 0x03, 0x00, 0x00, 1, 2, 3]]);
    assert_eq!(
        snappy_error(&stream),
        "snappy: chunk of 3 bytes is too short for its checksum"
    );
}

#[test]
fn snappy_corrupt_compressed_body_is_an_error() {
    // Claims 100 bytes of output, carries a literal longer than its input.
    let stream = snappy_stream(&[&[0x00, 0x07, 0x00, 0x00, 0, 0, 0, 0, 100, 0xf0, 0x01]]);
    assert!(snappy_error(&stream).starts_with("snappy: corrupt compressed chunk: "));
    // Claims more than a block's worth of output.
    let stream = snappy_stream(&[&[0x00, 0x08, 0x00, 0x00, 0, 0, 0, 0, 0x81, 0x80, 0x04, 0]]);
    assert_eq!(
        snappy_error(&stream),
        "snappy: chunk decompresses to 65537 bytes, more than 65536"
    );
}

#[test]
fn snappy_skips_padding_and_skippable_chunks_split_anywhere() {
    let data = compressible(1000);
    let ours = compress_all(Compressor::snappy(), &data);
    let mut stream = ours[..10].to_vec();
    stream.extend_from_slice(&[0xfe, 3, 0, 0, 9, 9, 9]);
    stream.extend_from_slice(&[0x80, 0, 0, 0]);
    stream.extend_from_slice(&[0xfd, 0x10, 0x27, 0]); // 10000 bytes of nothing
    stream.extend_from_slice(&[0xaa; 10000]);
    stream.extend_from_slice(&ours[10..]);
    stream.extend_from_slice(SNAPPY_STREAM_IDENTIFIER); // may repeat
    stream.extend_from_slice(&ours[10..]);
    for cuts in [
        vec![],
        vec![12, 13, 20, 5000, 10_030],
        vec![11, 18, 10_018, 10_019],
    ] {
        let mut dec = Decompressor::snappy();
        let mut out = BytesMut::new();
        feed_split(&mut dec, &stream, &cuts, &mut out);
        assert_eq!(&out[..], &[&data[..], &data[..]].concat()[..]);
    }
}

#[test]
fn snappy_partial_chunk_is_not_pending() {
    let wire = compress_all(Compressor::snappy(), &compressible(1000));
    let mut dec = Decompressor::snappy();
    dec.feed(&wire[..wire.len() - 1]);
    let mut out = BytesMut::new();
    assert_eq!(dec.decompress(&mut out, 1 << 20).unwrap(), 0);
    assert!(
        !dec.has_pending(),
        "decompress cannot progress without the last byte"
    );
    dec.feed(&wire[wire.len() - 1..]);
    assert!(dec.has_pending());
    assert_eq!(dec.decompress(&mut out, 1 << 20).unwrap(), 1000);
}

#[test]
fn garbage_deflate_is_an_error_and_stays_one() {
    let mut dec = Decompressor::deflate();
    // BFINAL=1, BTYPE=11: a reserved block type.
    dec.feed(&[0xff; 16]);
    let mut out = BytesMut::new();
    let err = dec.decompress(&mut out, 1024).unwrap_err();
    assert!(err.to_string().starts_with("deflate: "), "{err}");
    assert!(matches!(err, CompressionError::Deflate(_)));
    dec.feed(&compress_all(Compressor::deflate(1), b"fine"));
    assert!(dec.decompress(&mut out, 1024).is_err());
}

// ---------------------------------------------------------------------------------------
// The output limit

#[test]
fn limit_is_honoured_on_highly_compressible_input() {
    const TOTAL: usize = 8 << 20;
    const LIMIT: usize = 4096;
    let zeros = vec![0u8; TOTAL];
    for (comp, mut dec, slack) in [
        (Compressor::deflate(9), Decompressor::deflate(), 0),
        (
            Compressor::snappy(),
            Decompressor::snappy(),
            SNAPPY_MAX_BLOCK,
        ),
    ] {
        let wire = compress_all(comp, &zeros);
        assert!(wire.len() < TOTAL / 20, "{} bytes on the wire", wire.len());
        dec.feed(&wire);
        let mut out = BytesMut::new();
        let mut calls = 0;
        while dec.has_pending() {
            let before = out.len();
            let n = dec.decompress(&mut out, LIMIT).unwrap();
            assert_eq!(out.len() - before, n);
            assert!(n <= LIMIT + slack, "{n} bytes in one call");
            // A consumer takes what it was given before asking for more.
            out.clear();
            calls += 1;
            if n == 0 {
                break;
            }
        }
        assert!(calls >= TOTAL / (LIMIT + slack), "{calls} calls");
        assert_eq!(dec.decompress(&mut out, LIMIT).unwrap(), 0);
    }
}

#[test]
fn limit_counts_total_output_across_the_stream() {
    let data = compressible(1 << 20);
    for (comp, mut dec) in [
        (Compressor::deflate(6), Decompressor::deflate()),
        (Compressor::snappy(), Decompressor::snappy()),
    ] {
        dec.feed(&compress_all(comp, &data));
        let mut out = BytesMut::new();
        while dec.has_pending() {
            dec.decompress(&mut out, 1000).unwrap();
        }
        assert_eq!(&out[..], &data[..]);
    }
}
