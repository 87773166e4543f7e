//! Feeds arbitrary bytes to the frame decoder, whole and in pieces; decoded frames must
//! encode back to the bytes they came from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::wire::Frame;

fn decode(input: &[u8], max: usize, piece: usize) -> (Vec<Frame>, Option<String>) {
    let mut src = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in input.chunks(piece.max(1)) {
        src.extend_from_slice(chunk);
        loop {
            let before = src.len();
            match Frame::decode(&mut src, max) {
                Ok(Some(frame)) => {
                    assert!(src.len() < before, "frame consumed nothing");
                    frames.push(frame);
                }
                Ok(None) => {
                    assert_eq!(src.len(), before, "incomplete frame consumed input");
                    break;
                }
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let max = [4usize, 64, 4096, 1 << 20][usize::from(control & 3)];
    let piece = usize::from(control >> 2);
    let (frames, err) = decode(input, max, input.len());
    if piece > 0 {
        assert_eq!(decode(input, max, piece), (frames.clone(), err.clone()));
    }
    let mut encoded = BytesMut::new();
    for f in &frames {
        f.encode(&mut encoded);
    }
    assert_eq!(&encoded[..], &input[..encoded.len()]);
});
