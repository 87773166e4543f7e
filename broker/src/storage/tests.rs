//! Disk queue tests: reopen, roll, torn tails, damaged records, segments and metadata,
//! injected faults, crashes and power losses, size on disk, I/O counts, and a model test
//! against an in-memory queue.

use super::*;
use bytes::Bytes;
use proptest::prelude::*;
use proto::wire::MessageId;
use std::fs;
use std::ops::Range;
use std::path::PathBuf;
use tempfile::TempDir;

const NAME: &str = "topic:chan";

fn options(max_bytes_per_file: u64) -> DiskQueueOptions {
    DiskQueueOptions {
        max_bytes_per_file,
        sync_every: 100,
        max_msg_size: 4096,
        ..DiskQueueOptions::default()
    }
}

fn body(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|k| (seed as usize * 31 + k) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A record with an nsqd id, not deferred: 29 bytes plus its body on disk.
fn plain(i: u64, len: usize) -> DiskRecord {
    DiskRecord {
        id: MessageId::from_u64(0x1234_5678_0000 + i),
        timestamp: 1_700_000_000_000_000_000 + i as i64,
        attempts: (i % 5) as u16,
        due_unix_ms: 0,
        dead_letter: i % 11 == 5,
        body: body(i, len),
    }
}

/// Records of every shape: some deferred, some with ids that are not nsqd's hex.
fn varied(i: u64, len: usize) -> DiskRecord {
    let mut record = plain(i, len);
    if i % 4 == 1 {
        record.due_unix_ms = 1_700_000_000_000 + i as i64;
    }
    if i % 7 == 3 {
        record.id = raw_id(i);
    }
    record
}

fn raw_id(i: u64) -> MessageId {
    let text = format!("R{i:015}");
    let mut id = [0u8; 16];
    id.copy_from_slice(text.as_bytes());
    MessageId(id)
}

fn plains(range: Range<u64>, len: usize) -> Vec<DiskRecord> {
    range.map(|i| plain(i, len)).collect()
}

fn varieds(range: Range<u64>, len: usize) -> Vec<DiskRecord> {
    range.map(|i| varied(i, len)).collect()
}

fn open(dir: &TempDir, options: &DiskQueueOptions) -> (DiskQueue, OpenReport) {
    DiskQueue::open(dir.path(), NAME, options.clone()).unwrap()
}

/// Pops up to `max` records, keeping their tickets.
fn pop(queue: &mut DiskQueue, max: usize) -> Vec<(DiskRecord, Ticket)> {
    let mut out = Vec::new();
    queue.pop(max, &mut out).unwrap();
    out
}

fn records(popped: &[(DiskRecord, Ticket)]) -> Vec<DiskRecord> {
    popped.iter().map(|(r, _)| r.clone()).collect()
}

/// Pops and finishes `max` records, as a consumer that FINs at once.
fn consume(queue: &mut DiskQueue, max: usize) -> Vec<DiskRecord> {
    let popped = pop(queue, max);
    for (_, ticket) in &popped {
        queue.finish(*ticket);
    }
    records(&popped)
}

/// Pops and finishes everything.
fn consume_all(queue: &mut DiskQueue) -> Vec<DiskRecord> {
    let mut out = Vec::new();
    loop {
        let got = consume(queue, 7);
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

/// `record` as handed out again after a crash: one more attempt.
fn again(record: &DiskRecord) -> DiskRecord {
    DiskRecord {
        attempts: record.attempts + 1,
        ..record.clone()
    }
}

fn files_ending(dir: &TempDir, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// Segment files of queue [`NAME`].
fn segments(dir: &TempDir) -> Vec<String> {
    let prefix = format!("{NAME}.diskqueue.");
    files_ending(dir, ".dat")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn segment(dir: &TempDir, n: u64) -> PathBuf {
    dir.path().join(format!("{NAME}.diskqueue.{n:06}.dat"))
}

fn meta_path(dir: &TempDir) -> PathBuf {
    dir.path().join(format!("{NAME}.diskqueue.meta"))
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x5a;
    fs::write(path, bytes).unwrap();
}

fn len_of(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// Deterministic noise (xorshift).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn bad_files(dir: &TempDir) -> Vec<String> {
    files_ending(dir, ".bad")
}

/// A 200-byte body with an nsqd id on disk.
const PLAIN_200: u64 = 229;

#[test]
fn reopen_returns_the_same_records_in_order() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.metadata, MetadataState::Created);
    assert!(!report.repaired());
    let all = varieds(0..50, 100);
    for batch in all.chunks(7) {
        queue.append(batch).unwrap();
    }
    assert_eq!(queue.depth(), 50);
    queue.sync().unwrap();
    drop(queue);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.metadata, MetadataState::Loaded);
    assert_eq!(report.depth, 50);
    assert_eq!(report.unsynced_records_kept, 0);
    assert!(!report.repaired());
    assert_eq!(consume(&mut queue, 20), all[..20]);
    assert_eq!(queue.depth(), 30);
    queue.sync().unwrap();
    drop(queue);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 30);
    assert_eq!(report.handed_out_again, 0);
    assert_eq!(consume_all(&mut queue), all[20..]);
    assert_eq!(queue.depth(), 0);
    // Deferred messages keep their due time, odd ids come back as they were.
    assert_eq!(all[1].due_unix_ms, 1_700_000_000_001);
    assert_eq!(all[3].id, raw_id(3));
}

#[test]
fn a_process_crash_loses_no_write_and_hands_out_again_only_what_was_not_finished() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = varieds(0..15, 30);
    queue.append(&all[..10]).unwrap();
    queue.sync().unwrap();
    queue.append(&all[10..]).unwrap();
    let popped = pop(&mut queue, 6);
    // Finished out of order: 0, 2, 3 and 5; 1 and 4 are still with their consumer.
    for i in [0, 2, 3, 5] {
        queue.finish(popped[i].1);
    }
    // The next pop writes the journal entry that records those finishes.
    let more = pop(&mut queue, 1);
    assert_eq!(records(&more), all[6..7]);
    drop(queue); // no sync: the process died

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.metadata, MetadataState::Loaded);
    assert_eq!(report.unsynced_records_kept, 5);
    assert_eq!(report.torn_segments, 0);
    assert_eq!(report.handed_out_again, 3);
    assert_eq!(report.finished_skipped, 4);
    assert_eq!(report.depth, 11);
    let mut expected = vec![again(&all[1]), again(&all[4]), again(&all[6])];
    expected.extend_from_slice(&all[7..]);
    assert_eq!(consume_all(&mut queue), expected);
}

#[test]
fn finishes_after_the_last_journal_entry_come_back_and_nothing_is_stranded() {
    // The acknowledged-loss case: everything popped from a segment is finished, more is
    // popped from the same segment, and the process dies. Every record not finished comes
    // back, the newest included.
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..100, 200);
    for batch in all.chunks(10) {
        queue.append(batch).unwrap();
    }
    queue.sync().unwrap();
    assert_eq!(consume(&mut queue, 40).len(), 40);
    let held = pop(&mut queue, 30);
    queue.finish(held[0].1); // in the snapshot below
    queue.sync().unwrap();
    queue.finish(held[1].1); // in no journal entry yet: handed out again
    drop(queue);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 59);
    assert_eq!(report.handed_out_again, 29);
    let mut expected: Vec<DiskRecord> = all[41..70].iter().map(again).collect();
    expected.extend_from_slice(&all[70..]);
    assert_eq!(consume_all(&mut queue), expected);
    assert!(!queue.has_unread());
}

#[test]
fn segments_roll_and_finished_ones_are_deleted() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let (mut queue, _) = open(&dir, &options);
    // 8-byte header + two batches of two 229-byte records = 924 bytes per segment.
    let all = plains(0..24, 200);
    for batch in all.chunks(2) {
        queue.append(batch).unwrap();
    }
    assert_eq!(segments(&dir).len(), 6);
    for n in 0..5 {
        assert_eq!(len_of(&segment(&dir, n)), 924);
    }

    let first = pop(&mut queue, 5);
    assert_eq!(records(&first), all[..5]);
    queue.sync().unwrap();
    assert_eq!(segments(&dir).len(), 6, "segment 0 is not finished yet");
    for (_, ticket) in &first[..3] {
        queue.finish(*ticket);
    }
    queue.sync().unwrap();
    assert_eq!(segments(&dir).len(), 6, "record 3 is still handed out");
    queue.finish(first[3].1);
    assert!(queue.sync_due(), "a finished segment asks for a sync");
    queue.sync().unwrap();
    assert_eq!(segments(&dir).len(), 5, "segment 0 deleted once finished");
    assert!(!segment(&dir, 0).exists());
    queue.finish(first[4].1);
    let mut out = records(&first);
    out.extend(consume_all(&mut queue));
    assert_eq!(out, all);
    queue.sync().unwrap();
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000005.dat")]);

    // A record larger than a segment gets a segment of its own.
    let big = plain(100, 1500);
    queue.append([&big]).unwrap();
    assert_eq!(len_of(&segment(&dir, 6)), 8 + 29 + 1500);
    let small = plain(101, 10);
    queue.append([&small]).unwrap();
    assert_eq!(len_of(&segment(&dir, 7)), 8 + 29 + 10);
    assert_eq!(consume_all(&mut queue), [big, small]);
    queue.sync().unwrap();
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000007.dat")]);
    drop(queue);
    let (queue, report) = open(&dir, &options);
    assert_eq!(queue.depth(), 0);
    assert!(!report.repaired());
}

#[test]
fn a_large_segment_that_readers_caught_up_with_is_given_back() {
    let dir = TempDir::new().unwrap();
    let options = options(100 << 20);
    let (mut queue, _) = open(&dir, &options);
    // Just over ROLL_WHEN_READ in one segment, far below max_bytes_per_file.
    let all = plains(0..4600, 200);
    for batch in all.chunks(200) {
        queue.append(batch).unwrap();
    }
    assert!(len_of(&segment(&dir, 0)) > ROLL_WHEN_READ);
    assert_eq!(consume_all(&mut queue).len(), 4600);
    queue.sync().unwrap();
    assert!(segments(&dir).is_empty(), "{:?}", segments(&dir));
    let more = plains(5000..5002, 200);
    queue.append(&more).unwrap();
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000001.dat")]);
    assert_eq!(consume_all(&mut queue), more);
}

#[test]
fn a_batch_is_never_split_across_segments() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..10, 200);
    queue.append(&all[..1]).unwrap();
    queue.append(&all[1..]).unwrap();
    assert_eq!(len_of(&segment(&dir, 0)), 8 + PLAIN_200);
    assert_eq!(len_of(&segment(&dir, 1)), 8 + 9 * PLAIN_200);
    assert_eq!(consume_all(&mut queue), all);
}

#[test]
fn a_torn_tail_is_cut_at_open() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = varieds(0..7, 50);
    queue.append(&all[..3]).unwrap();
    queue.sync().unwrap();
    queue.append(&all[3..5]).unwrap();
    queue.append(&all[5..]).unwrap();
    drop(queue);
    // The crash tore the last record of the last batch.
    let path = segment(&dir, 0);
    let full = len_of(&path);
    truncate(&path, full - 10);

    let last_batch: u64 = all[5..].iter().map(|r| record::encoded_len(r) as u64).sum();
    let (mut queue, report) = open(&dir, &options);
    assert!(report.repaired());
    assert_eq!(report.metadata, MetadataState::Loaded);
    assert_eq!(report.torn_segments, 1);
    assert_eq!(report.torn_bytes_cut, last_batch - 10);
    assert_eq!(report.unsynced_records_kept, 2);
    assert_eq!(report.depth, 5);
    assert_eq!(len_of(&path), full - last_batch);
    assert_eq!(consume_all(&mut queue), all[..5]);

    // The queue goes on normally, and the repair was made durable.
    let more = varieds(10..12, 50);
    queue.append(&more).unwrap();
    assert_eq!(consume_all(&mut queue), more);
    queue.sync().unwrap();
    drop(queue);
    let (queue, report) = open(&dir, &options);
    assert!(!report.repaired());
    assert_eq!(queue.depth(), 0);
}

#[test]
fn a_batch_torn_between_two_records_is_cut_whole() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..5, 200);
    queue.append(&all[..2]).unwrap();
    queue.sync().unwrap();
    queue.append(&all[2..]).unwrap();
    drop(queue);
    // Only the first record of the three-record batch reached the disk.
    truncate(&segment(&dir, 0), 8 + 3 * PLAIN_200);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.torn_segments, 1);
    assert_eq!(report.torn_bytes_cut, PLAIN_200);
    assert_eq!(report.depth, 2);
    assert_eq!(consume_all(&mut queue), all[..2]);
}

#[test]
fn a_torn_segment_header_after_a_roll_is_cut() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..6, 200);
    queue.append(&all[..4]).unwrap();
    queue.sync().unwrap();
    queue.append(&all[4..]).unwrap();
    drop(queue);
    truncate(&segment(&dir, 1), 5);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.torn_segments, 1);
    assert_eq!(report.torn_bytes_cut, 5);
    assert_eq!(report.depth, 4);
    let more = plains(10..11, 200);
    queue.append(&more).unwrap();
    let mut expected = all[..4].to_vec();
    expected.extend(more);
    assert_eq!(consume_all(&mut queue), expected);
}

/// Three segments of four plain 200-byte records each, synced.
fn three_segments(dir: &TempDir) -> (DiskQueue, Vec<DiskRecord>) {
    let (mut queue, _) = open(dir, &options(1000));
    let all = plains(0..12, 200);
    for batch in all.chunks(2) {
        queue.append(batch).unwrap();
    }
    queue.sync().unwrap();
    assert_eq!(segments(dir).len(), 3);
    (queue, all)
}

/// Where record `k` of segment `n` of [`three_segments`] starts.
fn record_offset(k: u64) -> u64 {
    8 + k * PLAIN_200
}

/// Everything but records `lost`.
fn all_but(all: &[DiskRecord], lost: &[usize]) -> Vec<DiskRecord> {
    all.iter()
        .enumerate()
        .filter(|(i, _)| !lost.contains(i))
        .map(|(_, r)| r.clone())
        .collect()
}

#[test]
fn a_flipped_body_byte_costs_one_record() {
    for reopen in [false, true] {
        let dir = TempDir::new().unwrap();
        let (mut queue, all) = three_segments(&dir);
        // The body of the second record of segment 1 (record 5).
        flip_byte(&segment(&dir, 1), (record_offset(1) + 29 + 100) as usize);
        if reopen {
            drop(queue);
            let (reopened, report) = open(&dir, &options(1000));
            assert_eq!(report.metadata, MetadataState::Loaded);
            queue = reopened;
        }
        assert_eq!(consume(&mut queue, 5), all[..5]);
        assert_eq!(queue.damage(), Damage::default());
        // The next pop meets the damage, steps over record 5 and goes on with record 6.
        assert_eq!(consume(&mut queue, 1), all[6..7]);
        assert_eq!(
            queue.damage(),
            Damage {
                records: 1,
                bytes: PLAIN_200
            }
        );
        let bad = bad_files(&dir);
        assert_eq!(
            bad,
            [format!(
                "{NAME}.diskqueue.000001.dat.{}.bad",
                record_offset(1)
            )]
        );
        // The damaged bytes are kept for inspection.
        let kept = fs::read(dir.path().join(&bad[0])).unwrap();
        assert_eq!(kept.len() as u64, PLAIN_200);
        assert_eq!(&kept[..2], &[0xD7, 0x1E]);
        let mut got = all[..5].to_vec();
        got.push(all[6].clone());
        got.extend(consume_all(&mut queue));
        assert_eq!(got, all_but(&all, &[5]));
        queue.sync().unwrap();
        drop(queue);
        let (queue, report) = open(&dir, &options(1000));
        assert_eq!(report.metadata, MetadataState::Loaded);
        assert_eq!(queue.depth(), 0);
    }
}

#[test]
fn a_damaged_length_or_marker_costs_one_record() {
    // Every byte of record 5's prefix: the marker, the length and the checksum.
    for byte in 0..10u64 {
        let dir = TempDir::new().unwrap();
        let (mut queue, all) = three_segments(&dir);
        flip_byte(&segment(&dir, 1), (record_offset(1) + byte) as usize);
        assert_eq!(consume_all(&mut queue), all_but(&all, &[5]), "byte {byte}");
        assert_eq!(queue.damage().records, 1, "byte {byte}");
    }
    // A length claiming far more than --max-msg-size is caught before reading the body.
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    let path = segment(&dir, 1);
    let mut bytes = fs::read(&path).unwrap();
    let at = record_offset(0) as usize + 2;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    fs::write(&path, bytes).unwrap();
    assert_eq!(consume_all(&mut queue), all_but(&all, &[4]));
}

#[test]
fn a_damaged_segment_header_costs_no_record() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    flip_byte(&segment(&dir, 1), 2);
    assert_eq!(consume_all(&mut queue), all);
    assert_eq!(
        queue.damage(),
        Damage {
            records: 0,
            bytes: 8
        }
    );
    drop(queue);
    // Scanning at open finds every record too.
    let dir = TempDir::new().unwrap();
    let (queue, all) = three_segments(&dir);
    drop(queue);
    flip_byte(&segment(&dir, 1), 5);
    fs::remove_file(meta_path(&dir)).unwrap();
    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.depth, 12);
    assert_eq!(consume_all(&mut queue), all);
}

#[test]
fn damage_in_the_segment_being_written_is_stepped_over() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..5, 200);
    queue.append(&all).unwrap();
    flip_byte(&segment(&dir, 0), (record_offset(2) + 40) as usize);

    assert_eq!(consume_all(&mut queue), all_but(&all, &[2]));
    assert_eq!(queue.damage().records, 1);
    assert_eq!(queue.depth(), 0);
    assert_eq!(bad_files(&dir).len(), 1);
    let more = plains(10..13, 200);
    queue.append(&more).unwrap();
    assert_eq!(queue.depth(), 3);
    assert_eq!(consume_all(&mut queue), more);
}

/// Damages segment 1 of three, then checks what is read and what is counted lost.
fn check_damaged_middle_segment(damage: impl FnOnce(&Path), lost: &[usize], reopen: bool) {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    if reopen {
        drop(queue);
        damage(&segment(&dir, 1));
        let (reopened, report) = open(&dir, &options(1000));
        assert_eq!(report.metadata, MetadataState::Loaded);
        queue = reopened;
    } else {
        damage(&segment(&dir, 1));
    }
    assert_eq!(consume_all(&mut queue), all_but(&all, lost));
    assert_eq!(queue.depth(), 0);
    assert_eq!(bad_files(&dir).len(), 1);
    queue.sync().unwrap();
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000002.dat")]);
}

#[test]
fn a_garbage_segment_costs_its_records_only() {
    for reopen in [false, true] {
        check_damaged_middle_segment(
            |path| fs::write(path, noise(924, 42)).unwrap(),
            &[4, 5, 6, 7],
            reopen,
        );
    }
}

#[test]
fn a_segment_with_a_truncated_header_costs_its_records_only() {
    for reopen in [false, true] {
        check_damaged_middle_segment(|path| truncate(path, 5), &[4, 5, 6, 7], reopen);
    }
}

#[test]
fn a_segment_ending_in_a_truncated_record_keeps_its_whole_records() {
    for reopen in [false, true] {
        check_damaged_middle_segment(
            |path| truncate(path, record_offset(1) + 4),
            &[5, 6, 7],
            reopen,
        );
    }
}

#[test]
fn version_1_segments_and_metadata_are_still_read() {
    let dir = TempDir::new().unwrap();
    // A queue as knsq wrote it before records had a marker: one segment, three records in one
    // batch, and 52-byte metadata with the read position after the first record.
    let all = plains(0..3, 200);
    let mut bytes = record::Format::V1.header().to_vec();
    for (i, r) in all.iter().enumerate() {
        record::encode_v1(&mut bytes, r, i == 2);
    }
    fs::write(segment(&dir, 0), &bytes).unwrap();
    let mut meta = Vec::new();
    meta.extend_from_slice(b"KQDM\x00\x01\x00\x00");
    for word in [2u64, 0, 8 + 227, 0, bytes.len() as u64] {
        meta.extend_from_slice(&word.to_be_bytes());
    }
    let crc = crc32fast::hash(&meta);
    meta.extend_from_slice(&crc.to_be_bytes());
    fs::write(meta_path(&dir), meta).unwrap();

    let options = options(1 << 20);
    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.metadata, MetadataState::Loaded);
    assert_eq!(report.depth, 2);
    // New records follow in a new-format segment.
    let more = plains(10..12, 200);
    queue.append(&more).unwrap();
    let mut expected = all[1..].to_vec();
    expected.extend_from_slice(&more);
    assert_eq!(consume_all(&mut queue), expected);
    // Damage in an old segment is stepped over too.
    let dir = TempDir::new().unwrap();
    let mut damaged = bytes.clone();
    damaged[8 + 227 + 50] ^= 1;
    fs::write(segment(&dir, 0), &damaged).unwrap();
    let (mut queue, _) = open(&dir, &options);
    assert_eq!(consume_all(&mut queue), [all[0].clone(), all[2].clone()]);
}

#[test]
fn corrupt_or_missing_metadata_is_rebuilt_from_the_segments() {
    for damage in ["garbage", "short", "missing"] {
        let dir = TempDir::new().unwrap();
        let (mut queue, all) = three_segments(&dir);
        consume(&mut queue, 5);
        queue.sync().unwrap();
        drop(queue);
        assert!(!segment(&dir, 0).exists());
        match damage {
            "garbage" => fs::write(meta_path(&dir), noise(120, 7)).unwrap(),
            "short" => fs::write(meta_path(&dir), noise(13, 9)).unwrap(),
            _ => fs::remove_file(meta_path(&dir)).unwrap(),
        }

        let (mut queue, report) = open(&dir, &options(1000));
        let state = if damage == "missing" {
            MetadataState::Missing
        } else {
            MetadataState::Corrupt
        };
        assert_eq!(report.metadata, state);
        assert!(report.repaired());
        // The read position is lost: segment 1 is read again from its start.
        assert_eq!(report.depth, 8);
        assert_eq!(consume_all(&mut queue), all[4..]);
        queue.sync().unwrap();
        drop(queue);
        let (_, report) = open(&dir, &options(1000));
        assert_eq!(report.metadata, MetadataState::Loaded);
        assert_eq!(report.depth, 0);
    }
}

#[test]
fn metadata_that_does_not_match_the_files_is_rebuilt_from_the_read_position() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    consume(&mut queue, 5);
    queue.sync().unwrap();
    drop(queue);
    // Synced data went missing: segment 2 ends in the middle of record 9.
    truncate(&segment(&dir, 2), 8 + PLAIN_200 + 100);

    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.metadata, MetadataState::Inconsistent);
    // Record 8 goes too: its batch (8, 9) is not whole.
    assert_eq!(report.torn_segments, 1);
    assert_eq!(report.torn_bytes_cut, PLAIN_200 + 100);
    assert_eq!(report.depth, 3);
    assert_eq!(consume_all(&mut queue), all[5..8]);
}

#[test]
fn stale_consumed_segments_are_removed_at_open() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    consume(&mut queue, 5);
    queue.sync().unwrap();
    drop(queue);
    // As if the process died after the snapshot moved on but before the delete.
    fs::write(segment(&dir, 0), b"old").unwrap();
    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.stale_segments_removed, 1);
    assert!(!segment(&dir, 0).exists());
    assert_eq!(consume_all(&mut queue), all[5..]);
}

#[test]
fn segments_deleted_before_the_snapshot_moved_on_count_as_consumed() {
    // A full disk: the snapshot could not be written, the finished segment was deleted anyway.
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    consume(&mut queue, 4);
    pop(&mut queue, 1);
    drop(queue);
    fs::remove_file(segment(&dir, 0)).unwrap();
    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.metadata, MetadataState::Loaded);
    let mut expected = vec![again(&all[4])];
    expected.extend_from_slice(&all[5..]);
    assert_eq!(consume_all(&mut queue), expected);
}

#[test]
fn a_failed_append_leaves_nothing_behind_and_writes_work_again_after() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let faults = options.faults.clone();
    let (mut queue, _) = open(&dir, &options);
    let a = varieds(0..5, 100);
    queue.append(&a).unwrap();
    queue.sync().unwrap();
    let path = segment(&dir, 0);
    let before = len_of(&path);

    faults.set_failing(true);
    let b = varieds(10..20, 100);
    let error = queue.append(&b).unwrap_err();
    assert!(matches!(error, StorageError::Write { .. }), "{error}");
    assert_eq!(len_of(&path), before, "the half-written batch is truncated");
    assert_eq!(queue.depth(), 5);
    // Reads still work; syncs fail and leave no temporary file behind.
    assert_eq!(consume(&mut queue, 2), a[..2]);
    assert!(queue.sync().is_err());
    assert!(files_ending(&dir, ".tmp").is_empty());

    faults.set_failing(false);
    let c = varieds(20..23, 100);
    queue.append(&c).unwrap();
    queue.sync().unwrap();
    drop(queue);
    let (mut queue, report) = open(&dir, &options);
    assert!(!report.repaired());
    let mut expected = a[2..].to_vec();
    expected.extend_from_slice(&c);
    assert_eq!(consume_all(&mut queue), expected);
}

#[test]
fn a_failed_append_is_not_visible_after_a_crash() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let faults = options.faults.clone();
    let (mut queue, _) = open(&dir, &options);
    let a = plains(0..3, 200);
    queue.append(&a).unwrap();
    queue.sync().unwrap();
    faults.set_failing(true);
    // Needs a new segment: the failed write leaves that segment empty.
    assert!(queue.append(&plains(10..12, 200)).is_err());
    assert!(queue.append(&plains(12..14, 200)).is_err());
    drop(queue);
    faults.set_failing(false);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 3);
    assert_eq!(report.torn_bytes_cut, 0);
    let d = plains(20..22, 200);
    queue.append(&d).unwrap();
    let mut expected = a.clone();
    expected.extend_from_slice(&d);
    assert_eq!(consume_all(&mut queue), expected);
}

#[test]
fn after_a_failed_write_the_segment_is_given_back_once_read() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let faults = options.faults.clone();
    let (mut queue, _) = open(&dir, &options);
    let a = plains(0..3, 200);
    queue.append(&a).unwrap();
    faults.set_failing(true);
    assert!(queue.append(&plains(3..4, 200)).is_err());
    // The disk is still full: the snapshot cannot be written, but the segment that readers
    // have finished goes anyway, which gives the space back.
    assert_eq!(consume_all(&mut queue), a);
    assert!(queue.sync().is_err());
    assert!(segments(&dir).is_empty(), "{:?}", segments(&dir));
    assert!(files_ending(&dir, ".tmp").is_empty());
    faults.set_failing(false);
    let b = plains(10..12, 200);
    queue.append(&b).unwrap();
    queue.sync().unwrap();
    drop(queue);
    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 2);
    assert_eq!(consume_all(&mut queue), b);
}

#[test]
fn a_body_over_the_limit_is_refused_and_nothing_written() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let batch = [plain(0, 10), plain(1, 4097)];
    let error = queue.append(&batch).unwrap_err();
    assert!(matches!(
        error,
        StorageError::RecordTooLarge {
            len: 4097,
            max: 4096
        }
    ));
    assert_eq!(queue.depth(), 0);
    assert!(segments(&dir).is_empty());
    queue.append(&batch[..1]).unwrap();
    assert_eq!(consume_all(&mut queue), batch[..1]);
}

#[test]
fn a_queued_200_byte_message_takes_at_most_230_bytes_on_disk() {
    let dir = TempDir::new().unwrap();
    let options = DiskQueueOptions {
        max_bytes_per_file: 1 << 20,
        ..DiskQueueOptions::default()
    };
    let (mut queue, _) = open(&dir, &options);
    let count = 10_000u64;
    let all = plains(0..count, 200);
    for batch in all.chunks(200) {
        queue.append(batch).unwrap();
    }
    queue.sync().unwrap();
    let on_disk: u64 = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let per_message = on_disk as f64 / count as f64;
    assert!(per_message <= 230.0, "{per_message} bytes per message");

    assert_eq!(consume_all(&mut queue).len(), count as usize);
    queue.sync().unwrap();
    assert!(segments(&dir).len() <= 1, "{:?}", segments(&dir));
}

#[test]
fn one_write_per_batch_large_reads_and_shared_bodies() {
    let dir = TempDir::new().unwrap();
    let (mut queue, _) = open(&dir, &options(1 << 20));
    for batch in plains(0..1000, 200).chunks(200) {
        queue.append(batch).unwrap();
    }
    assert_eq!(queue.io_counts.writes, 5);
    let out = pop(&mut queue, 200);
    assert_eq!(out.len(), 200);
    assert_eq!(queue.io_counts.reads, 1);
    // Every body of the batch points into the same read buffer.
    let base = out[0].0.body.as_ptr() as usize;
    for (k, (record, _)) in out.iter().enumerate() {
        assert_eq!(record.body.as_ptr() as usize - base, k * PLAIN_200 as usize);
    }
    let mut total = out.len();
    loop {
        let got = pop(&mut queue, 200).len();
        if got == 0 {
            break;
        }
        total += got;
    }
    assert_eq!(total, 1000);
    // 229,008 bytes in 128 KiB reads.
    assert_eq!(queue.io_counts.reads, 2);
}

#[test]
fn sync_is_due_after_sync_every_operations() {
    let dir = TempDir::new().unwrap();
    let options = DiskQueueOptions {
        sync_every: 4,
        ..options(1 << 20)
    };
    let (mut queue, _) = open(&dir, &options);
    assert!(!queue.sync_due());
    queue.append(&plains(0..2, 10)).unwrap();
    assert!(!queue.sync_due());
    let popped = pop(&mut queue, 1);
    assert!(!queue.sync_due());
    queue.finish(popped[0].1);
    assert!(queue.sync_due(), "writes, reads and finishes count");
    queue.sync().unwrap();
    assert!(!queue.sync_due());
}

#[test]
fn empty_deletes_the_segments_and_the_queue_goes_on() {
    let dir = TempDir::new().unwrap();
    let (mut queue, _) = three_segments(&dir);
    let held = pop(&mut queue, 2);
    queue.empty().unwrap();
    assert_eq!(queue.depth(), 0);
    assert!(segments(&dir).is_empty());
    assert!(pop(&mut queue, 10).is_empty());
    // Finishing what was handed out before does nothing.
    queue.finish(held[0].1);
    let more = plains(50..53, 200);
    queue.append(&more).unwrap();
    drop(queue);
    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.depth, 3);
    assert_eq!(consume_all(&mut queue), more);
}

#[test]
fn delete_removes_every_file_of_the_queue_and_only_those() {
    let dir = TempDir::new().unwrap();
    let (mut other, _) = DiskQueue::open(dir.path(), "topic", options(1000)).unwrap();
    other.append(&plains(0..3, 10)).unwrap();
    other.sync().unwrap();
    let (queue, _) = three_segments(&dir);
    fs::write(
        dir.path()
            .join(format!("{NAME}.diskqueue.000000.dat.8.bad")),
        b"x",
    )
    .unwrap();
    queue.delete().unwrap();
    let left: Vec<String> = files_ending(&dir, "")
        .into_iter()
        .filter(|n| !n.contains("journal"))
        .collect();
    assert_eq!(
        left,
        ["topic.diskqueue.000000.dat", "topic.diskqueue.meta"].map(String::from)
    );
    assert!(files_ending(&dir, "").iter().all(|n| !n.starts_with(NAME)));
    assert_eq!(consume_all(&mut other), plains(0..3, 10));
}

#[test]
fn any_name_is_a_queue_of_its_own_and_only_the_empty_name_is_refused() {
    let dir = TempDir::new().unwrap();
    assert!(matches!(
        DiskQueue::open(dir.path(), "", options(1000)),
        Err(StorageError::InvalidName { .. })
    ));
    let names = [".", "..", "a.b", "a_b", "A.b", "a/b", "t:c#ephemeral"];
    for (i, name) in names.iter().enumerate() {
        let (mut queue, _) = DiskQueue::open(dir.path(), name, options(1000)).unwrap();
        queue.append(&plains(i as u64..i as u64 + 1, 10)).unwrap();
        queue.sync().unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        let (mut queue, _) = DiskQueue::open(dir.path(), name, options(1000)).unwrap();
        assert_eq!(
            consume_all(&mut queue),
            plains(i as u64..i as u64 + 1, 10),
            "{name}"
        );
    }
    // Nothing outside the directory, no hidden files.
    assert!(files_ending(&dir, "").iter().all(|n| !n.starts_with('.')));
}

#[test]
fn files_named_after_the_queue_verbatim_are_taken_over() {
    let dir = TempDir::new().unwrap();
    let encoded = DiskQueue::open(dir.path(), "Orders.v1", options(1000))
        .unwrap()
        .0;
    drop(encoded);
    let (mut queue, _) = DiskQueue::open(dir.path(), "x", options(1000)).unwrap();
    queue.append(&plains(0..3, 10)).unwrap();
    queue.sync().unwrap();
    drop(queue);
    // Give queue "x"'s files the verbatim name of "Orders.v1", as an older data directory has.
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let name = file.unwrap().file_name().into_string().unwrap();
        if let Some(rest) = name.strip_prefix("x.diskqueue.") {
            std::fs::rename(
                dir.path().join(&name),
                dir.path().join(format!("Orders.v1.diskqueue.{rest}")),
            )
            .unwrap();
        } else if name.starts_with("%4Frders%2Ev1.") {
            std::fs::remove_file(dir.path().join(&name)).unwrap();
        }
    }
    let (mut queue, _) = DiskQueue::open(dir.path(), "Orders.v1", options(1000)).unwrap();
    assert_eq!(queue.depth(), 3);
    assert_eq!(consume_all(&mut queue), plains(0..3, 10));
    assert!(
        files_ending(&dir, "")
            .iter()
            .all(|n| !n.starts_with("Orders"))
    );
}

#[test]
fn a_sync_job_covers_only_what_was_written_before_it_was_prepared() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let (mut queue, _) = open(&dir, &options);
    queue.append(&plains(0..2, 200)).unwrap();
    let mut job = queue.prepare_sync(true).unwrap();
    // Written while the job runs without the lock: in the same segment, then a new one.
    queue.append(&plains(2..4, 200)).unwrap();
    queue.append(&plains(4..6, 200)).unwrap();
    let result = job.run();
    queue.complete_sync(job, &result);
    result.unwrap();
    let mut job = queue
        .prepare_sync(false)
        .expect("later writes are still to sync");
    assert_eq!(job.files.len(), 2, "both segments written since");
    let result = job.run();
    queue.complete_sync(job, &result);
    assert!(queue.prepare_sync(false).is_none());
}

#[test]
fn random_damage_costs_only_the_damaged_records() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let rounds = std::env::var("KNSQ_DAMAGE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for round in 0..rounds {
        let dir = TempDir::new().unwrap();
        let (mut queue, _) = open(&dir, &options(1000));
        // Five segments of four records, two batches each.
        let all = plains(0..20, 200);
        for batch in all.chunks(2) {
            queue.append(batch).unwrap();
        }
        queue.sync().unwrap();
        drop(queue);

        let damaged = rand(5);
        let path = segment(&dir, damaged);
        let len = len_of(&path) as usize;
        // The bytes of the segment that were damaged, to tell which records may be lost.
        let mut hit = Vec::new();
        match rand(4) {
            0 => {
                for _ in 0..=rand(3) {
                    let at = rand(len as u64) as usize;
                    flip_byte(&path, at);
                    hit.push(at..at + 1);
                }
            }
            1 => {
                let at = rand(len as u64) as usize;
                truncate(&path, at as u64);
                hit.push(at..len);
            }
            2 => {
                let mut bytes = fs::read(&path).unwrap();
                let at = rand(len as u64) as usize;
                let n = (1 + rand(300) as usize).min(len - at);
                bytes[at..at + n].copy_from_slice(&noise(n, round + 1));
                fs::write(&path, bytes).unwrap();
                hit.push(at..at + n);
            }
            _ => {
                let mut bytes = fs::read(&path).unwrap();
                bytes.extend(noise(1 + rand(400) as usize, round + 7));
                fs::write(&path, bytes).unwrap();
            }
        }
        if rand(2) == 0 {
            fs::write(meta_path(&dir), noise(80, round)).unwrap();
        }

        let (mut queue, _) = open(&dir, &options(1000));
        let got = consume_all(&mut queue);
        // In order, each one appended once.
        let mut next = 0;
        for record in &got {
            let i = all[next..]
                .iter()
                .position(|r| r == record)
                .unwrap_or_else(|| panic!("round {round}: unknown or out-of-order record"));
            next += i + 1;
        }
        // In the last segment, recovery keeps whole batches only: damage anywhere in a batch
        // (two records) may cost both.
        if damaged == 4 {
            let batch = 2 * PLAIN_200 as usize;
            for h in &mut hit {
                h.start = 8 + (h.start.saturating_sub(8) / batch) * batch;
            }
        }
        // Only records whose bytes (or the header of their segment) were hit are missing.
        for (i, record) in all.iter().enumerate() {
            let in_segment = i as u64 / 4 == damaged;
            let start = record_offset(i as u64 % 4) as usize;
            let bytes = start..start + PLAIN_200 as usize;
            let touched = in_segment
                && hit.iter().any(|h| {
                    h.start < bytes.end && bytes.start < h.end.max(h.start + 1) || h.start < 8
                });
            if !touched {
                assert!(
                    got.contains(record),
                    "round {round}: record {i} lost; hit {hit:?} in segment {damaged}"
                );
            }
        }
        queue.sync().unwrap();
        drop(queue);
        let (mut queue, report) = open(&dir, &options(1000));
        assert_eq!(report.depth, 0, "round {round}");
        assert!(consume_all(&mut queue).is_empty(), "round {round}");
    }
}

/// What the model knows of one record appended to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Not handed out since the last open.
    Waiting,
    /// Handed out; `journaled`: a journal entry says so.
    HandedOut { ticket: Ticket },
    /// Stored again; finished once sync pass `pass` has completed.
    FinishWhenDurable { ticket: Ticket, pass: u64 },
    /// Finished; `journaled`: a journal entry says so; `snapshot`: a snapshot does.
    Finished { journaled: bool, snapshot: bool },
    /// Emptied away, or known not to come back.
    Gone,
}

#[derive(Debug, Clone)]
struct Modelled {
    record: DiskRecord,
    status: Status,
    /// Survives a power loss: a sync covered its append.
    durable: bool,
    /// After a crash it may come back or not (finished but not journaled, or not durable).
    optional: bool,
    /// Handed out before the last crash: comes back with at least this many attempts.
    min_attempts: u16,
    /// Attempts as appended.
    stored_attempts: u16,
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// Bodies of these lengths, some deferred, some with ids that are not hex.
    Append(Vec<(usize, bool, bool)>),
    Pop(usize),
    /// Finish the n-th record handed out (modulo how many are).
    Finish(usize),
    /// Store the n-th record handed out again at the back, finishing it once durable.
    Requeue(usize),
    /// A sync pass: data only, or full.
    Sync(bool),
    /// A sync prepared and left to run later, as the syncer does without the queue's lock
    /// while publishers and consumers go on: data only, or full.
    Prepare(bool),
    /// Runs and completes the n-th prepared sync (modulo how many wait).
    Complete(usize),
    /// Drop without syncing (a process crash) and open again; prepared syncs whose bit is set
    /// had run (their snapshot written) but not completed.
    Crash(u8),
    /// Lose what was not fsynced, keeping a random part of what was written since.
    PowerLoss(u8),
    /// An append while the fault switch is on.
    FailedAppend(usize),
    Empty,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec((0usize..400, any::<bool>(), prop::bool::weighted(0.2)), 1..8)
            .prop_map(Op::Append),
        8 => (1usize..12).prop_map(Op::Pop),
        6 => any::<usize>().prop_map(Op::Finish),
        2 => any::<usize>().prop_map(Op::Requeue),
        3 => any::<bool>().prop_map(Op::Sync),
        2 => any::<bool>().prop_map(Op::Prepare),
        2 => any::<usize>().prop_map(Op::Complete),
        2 => any::<u8>().prop_map(Op::Crash),
        2 => any::<u8>().prop_map(Op::PowerLoss),
        1 => (1usize..5).prop_map(Op::FailedAppend),
        1 => Just(Op::Empty),
    ]
}

fn model_record(i: u64, (len, deferred, raw): (usize, bool, bool)) -> DiskRecord {
    let mut record = plain(i, len);
    record.attempts = 0;
    if deferred {
        record.due_unix_ms = 1_800_000_000_000 + i as i64;
    }
    if raw {
        record.id = raw_id(i);
    }
    record
}

struct Model {
    records: Vec<Modelled>,
    next: u64,
}

impl Model {
    fn handed_out(&self) -> Vec<usize> {
        (0..self.records.len())
            .filter(|&i| matches!(self.records[i].status, Status::HandedOut { .. }))
            .collect()
    }

    /// The queue finished what waited for a completed pass (it does so when it pops or
    /// syncs, then journals it).
    fn finish_durable(&mut self, completed: u64) {
        for m in &mut self.records {
            if let Status::FinishWhenDurable { pass, .. } = m.status
                && pass <= completed
            {
                m.status = Status::Finished {
                    journaled: true,
                    snapshot: false,
                };
            }
        }
    }

    /// A journal entry was written: every finish so far is in it.
    fn journal(&mut self) {
        for m in &mut self.records {
            if let Status::Finished { journaled, .. } = &mut m.status {
                *journaled = true;
            }
        }
    }

    /// After a crash: what comes back, what may, what may not.
    fn reopened(&mut self, power_loss: bool) {
        for m in &mut self.records {
            let (back, optional) = match m.status {
                Status::Gone => (false, false),
                Status::Finished { snapshot: true, .. } => (false, false),
                Status::Finished {
                    journaled: true, ..
                } if !power_loss => (false, false),
                Status::Finished { .. } => (true, true),
                Status::Waiting | Status::HandedOut { .. } | Status::FinishWhenDurable { .. } => {
                    (true, m.optional || (power_loss && !m.durable))
                }
            };
            // Handed out before a process crash: at least one attempt more than stored. (The
            // stored count does not grow with each crash; one more is what tells a client.)
            if let Status::HandedOut { .. } | Status::FinishWhenDurable { .. } = m.status
                && !power_loss
            {
                m.min_attempts = m.min_attempts.max(m.stored_attempts + 1);
            }
            m.status = if back { Status::Waiting } else { Status::Gone };
            m.optional = back && optional;
        }
    }
}

/// Runs `ops` against a disk queue and a model of what every record must, may and must not
/// do: nothing waiting or handed out is lost by a crash (after a power loss: nothing a sync
/// covered), nothing finished and journaled comes back after a process crash (after a power
/// loss: nothing finished in a snapshot), records come out in the order they went in, and
/// what was handed out before a process crash comes back with one more attempt.
fn run_model(max_bytes_per_file: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = TempDir::new().unwrap();
    let options = options(max_bytes_per_file);
    let faults = options.faults.clone();
    let passes = options.passes.clone();
    let (mut queue, _) = open(&dir, &options);
    power::track(dir.path());
    let mut model = Model {
        records: Vec::new(),
        next: 0,
    };
    // Syncs prepared and not yet completed. The model counts nothing they do as done (no
    // record durable, no finish in a snapshot): what may come back stays a superset.
    let mut prepared: Vec<sync::SyncJob> = Vec::new();
    let complete = |queue: &mut DiskQueue, mut job: sync::SyncJob| {
        let result = job.run();
        queue.complete_sync(job, &result);
        result
    };
    for op in ops {
        match op {
            Op::Append(specs) => {
                let records: Vec<DiskRecord> = specs
                    .iter()
                    .map(|&spec| {
                        model.next += 1;
                        model_record(model.next, spec)
                    })
                    .collect();
                queue.append(&records).unwrap();
                model
                    .records
                    .extend(records.into_iter().map(|record| Modelled {
                        stored_attempts: record.attempts,
                        record,
                        status: Status::Waiting,
                        durable: false,
                        optional: false,
                        min_attempts: 0,
                    }));
            }
            Op::Pop(max) => {
                model.finish_durable(passes.completed());
                let out = pop(&mut queue, max);
                model.journal();
                let mut at = 0;
                for (record, ticket) in out {
                    // The next waiting record; optional ones may have gone.
                    loop {
                        prop_assert!(at < model.records.len(), "popped an unknown record");
                        let m = &mut model.records[at];
                        at += 1;
                        if m.status != Status::Waiting {
                            continue;
                        }
                        let same = DiskRecord {
                            attempts: m.record.attempts,
                            ..record.clone()
                        } == m.record;
                        if same {
                            prop_assert!(
                                record.attempts >= m.min_attempts.max(m.stored_attempts),
                                "attempts {} below {}",
                                record.attempts,
                                m.min_attempts
                            );
                            m.record.attempts = record.attempts;
                            m.status = Status::HandedOut { ticket };
                            m.optional = false;
                            break;
                        }
                        prop_assert!(m.optional, "record {:?} was skipped", m.record.id);
                        m.status = Status::Gone;
                    }
                }
            }
            Op::Finish(n) => {
                let handed = model.handed_out();
                if let Some(&i) = handed.get(n % handed.len().max(1)) {
                    let Status::HandedOut { ticket } = model.records[i].status else {
                        unreachable!()
                    };
                    queue.finish(ticket);
                    model.records[i].status = Status::Finished {
                        journaled: false,
                        snapshot: false,
                    };
                }
            }
            Op::Requeue(n) => {
                let handed = model.handed_out();
                if let Some(&i) = handed.get(n % handed.len().max(1)) {
                    let Status::HandedOut { ticket } = model.records[i].status else {
                        unreachable!()
                    };
                    let mut copy = model.records[i].record.clone();
                    copy.attempts += 1;
                    // Told apart from the original by the model (the broker keeps it equal).
                    model.next += 1;
                    copy.timestamp = model.next as i64;
                    queue.append([&copy]).unwrap();
                    queue.finish_when_durable(ticket);
                    model.records[i].status = Status::FinishWhenDurable {
                        ticket,
                        pass: passes.next(),
                    };
                    model.records.push(Modelled {
                        stored_attempts: copy.attempts,
                        record: copy,
                        status: Status::Waiting,
                        durable: false,
                        optional: false,
                        min_attempts: 0,
                    });
                }
            }
            Op::Sync(full) => {
                let pass = passes.begin();
                model.finish_durable(passes.completed());
                let synced = if full {
                    queue.sync()
                } else {
                    queue.sync_data()
                };
                synced.unwrap();
                passes.completed_ok(pass);
                model.journal();
                for m in &mut model.records {
                    m.durable = true;
                    if full && let Status::Finished { snapshot, .. } = &mut m.status {
                        *snapshot = true;
                    }
                }
            }
            Op::Prepare(full) => {
                model.finish_durable(passes.completed());
                if let Some(job) = queue.prepare_sync(full) {
                    prepared.push(job);
                }
                model.journal();
                if prepared.len() > 3 {
                    let job = prepared.remove(0);
                    complete(&mut queue, job).unwrap();
                }
            }
            Op::Complete(n) => {
                if !prepared.is_empty() {
                    let job = prepared.remove(n % prepared.len());
                    complete(&mut queue, job).unwrap();
                }
            }
            Op::Crash(_) | Op::PowerLoss(_) => {
                for (i, mut job) in prepared.drain(..).enumerate() {
                    if let Op::Crash(ran) = op
                        && ran & (1 << i) != 0
                    {
                        job.run().unwrap();
                    }
                }
                drop(queue);
                let power_loss = matches!(op, Op::PowerLoss(_));
                if let Op::PowerLoss(seed) = op {
                    let mut state = u64::from(seed) | 1;
                    power::lose_power(dir.path(), |len| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % (len as u64 + 1)) as usize
                    });
                }
                let (reopened, _) = open(&dir, &options);
                queue = reopened;
                model.reopened(power_loss);
                if power_loss {
                    // What was just recovered is on disk as it is now.
                    for m in &mut model.records {
                        m.durable = m.durable || !m.optional;
                    }
                }
            }
            Op::FailedAppend(n) => {
                let records: Vec<DiskRecord> = (0..n)
                    .map(|_| {
                        model.next += 1;
                        plain(model.next, 150)
                    })
                    .collect();
                faults.set_failing(true);
                let result = queue.append(&records);
                faults.set_failing(false);
                prop_assert!(result.is_err());
            }
            Op::Empty => {
                for job in prepared.drain(..) {
                    complete(&mut queue, job).unwrap();
                }
                queue.empty().unwrap();
                for m in &mut model.records {
                    m.status = Status::Gone;
                }
            }
        }
    }
    for job in prepared.drain(..) {
        complete(&mut queue, job).unwrap();
    }
    // Consumers finish what they hold; then everything still to come, in order: required
    // records in full, optional ones maybe.
    for m in &mut model.records {
        if let Status::HandedOut { ticket } | Status::FinishWhenDurable { ticket, .. } = m.status {
            queue.finish(ticket);
            m.status = Status::Gone;
        }
    }
    let mut out = Vec::new();
    loop {
        let got = consume(&mut queue, 100);
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    let mut at = 0;
    for record in &out {
        loop {
            prop_assert!(at < model.records.len(), "an unknown record came out");
            let m = &model.records[at];
            at += 1;
            if m.status != Status::Waiting {
                continue;
            }
            let same = DiskRecord {
                attempts: m.record.attempts,
                ..record.clone()
            } == m.record;
            if same {
                break;
            }
            prop_assert!(m.optional, "record {:?} was lost", m.record.id);
        }
    }
    for m in &model.records[at..] {
        prop_assert!(
            m.status != Status::Waiting || m.optional,
            "record {:?} was lost",
            m.record.id
        );
    }
    queue.sync().unwrap();
    prop_assert!(segments(&dir).len() <= 1, "{:?}", segments(&dir));
    prop_assert!(bad_files(&dir).is_empty());
    drop(queue);
    let (mut queue, report) = open(&dir, &options);
    prop_assert_eq!(report.depth, 0);
    prop_assert!(consume_all(&mut queue).is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=2000 for a longer run.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_disk_queue_loses_nothing_and_repeats_only_what_it_may(
        max_bytes_per_file in 300u64..3000,
        ops in prop::collection::vec(op(), 1..(std::env::var("KNSQ_MODEL_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(80))),
    ) {
        run_model(max_bytes_per_file, ops)?;
    }
}

/// A snapshot is prepared under the owner's lock and written without it, while consumers go
/// on: what they were handed and finished meanwhile goes to the next snapshot's journal. A
/// crash before that snapshot lands (or between two snapshots of the same generation) must
/// still count it: handed out again with one more attempt, finished not handed out again.
#[test]
fn a_crash_while_snapshots_are_written_keeps_what_happened_meanwhile() {
    for ran in [None, Some(false), Some(true)] {
        let dir = TempDir::new().unwrap();
        let options = options(100_000);
        let (mut queue, _) = open(&dir, &options);
        let all = plains(0..9, 100);
        queue.append(&all).unwrap();
        queue.sync().unwrap();
        let first = pop(&mut queue, 3);
        queue.finish(first[0].1);
        let mut a = queue.prepare_sync(true).expect("a snapshot to write");
        // While `a` is written: a record finished, three more handed out, one finished.
        queue.finish(first[1].1);
        let second = pop(&mut queue, 3);
        queue.finish(second[0].1);
        // A second snapshot prepared before the first completed: the same generation.
        let mut b = queue.prepare_sync(true).expect("another snapshot to write");
        let third = pop(&mut queue, 1);
        match ran {
            // Neither snapshot reached the disk.
            None => {}
            // The first did and was taken in; the second never ran.
            Some(false) => {
                let result = a.run();
                queue.complete_sync(a, &result);
                result.unwrap();
            }
            // Both ran, the second without being taken in.
            Some(true) => {
                let result = a.run();
                queue.complete_sync(a, &result);
                result.unwrap();
                b.run().unwrap();
            }
        }
        drop(queue);
        let (mut queue, report) = open(&dir, &options);
        let unfinished = [&first[2], &second[1], &second[2], &third[0]];
        assert_eq!(report.handed_out_again, 4, "{ran:?}");
        let back = consume_all(&mut queue);
        let mut expected: Vec<DiskRecord> = unfinished.iter().map(|(r, _)| again(r)).collect();
        expected.extend(all[7..].iter().cloned());
        assert_eq!(back, expected, "{ran:?}");
    }
}

#[test]
fn a_power_loss_keeps_what_a_sync_covered() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let (mut queue, _) = open(&dir, &options);
    power::track(dir.path());
    let all = plains(0..10, 200);
    queue.append(&all[..6]).unwrap();
    queue.sync_data().unwrap();
    queue.append(&all[6..]).unwrap();
    let handed = pop(&mut queue, 3);
    queue.finish(handed[0].1);
    drop(queue);
    // Nothing written after the data sync survives, not even the snapshot's journal.
    power::lose_power(dir.path(), |_| 0);
    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 6);
    assert_eq!(consume_all(&mut queue), all[..6]);
}
