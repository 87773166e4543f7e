//! Disk queue tests: reopen, roll, torn tails, corrupt records, segments and metadata, injected
//! faults, size on disk, I/O counts, and a model test against an in-memory queue.

use super::*;
use bytes::Bytes;
use proptest::prelude::*;
use proto::wire::MessageId;
use std::collections::VecDeque;
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
        faults: FaultSwitch::default(),
    }
}

fn body(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|k| (seed as usize * 31 + k) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A record with an nsqd id, not deferred: 27 bytes plus its body on disk.
fn plain(i: u64, len: usize) -> DiskRecord {
    DiskRecord {
        id: MessageId::from_u64(0x1234_5678_0000 + i),
        timestamp: 1_700_000_000_000_000_000 + i as i64,
        attempts: (i % 5) as u16,
        due_unix_ms: 0,
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

fn pop_all(queue: &mut DiskQueue) -> Vec<DiskRecord> {
    let mut out = Vec::new();
    while queue.pop(7, &mut out).unwrap() > 0 {}
    out
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

const PLAIN_200: u64 = 227;

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
    let mut out = Vec::new();
    assert_eq!(queue.pop(20, &mut out).unwrap(), 20);
    assert_eq!(out, all[..20]);
    assert_eq!(queue.depth(), 30);
    queue.sync().unwrap();
    drop(queue);

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 30);
    assert_eq!(pop_all(&mut queue), all[20..]);
    assert_eq!(queue.depth(), 0);
    // Deferred messages keep their due time, odd ids come back as they were.
    assert_eq!(all[1].due_unix_ms, 1_700_000_000_001);
    assert_eq!(all[3].id, raw_id(3));
}

#[test]
fn a_process_crash_loses_no_write_and_hands_out_unsynced_pops_again() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = varieds(0..15, 30);
    queue.append(&all[..10]).unwrap();
    queue.sync().unwrap();
    queue.append(&all[10..]).unwrap();
    let mut out = Vec::new();
    queue.pop(3, &mut out).unwrap();
    drop(queue); // no sync: the process died

    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.metadata, MetadataState::Loaded);
    assert_eq!(report.unsynced_records_kept, 5);
    assert_eq!(report.torn_segments, 0);
    assert_eq!(report.depth, 15);
    assert_eq!(pop_all(&mut queue), all);
}

#[test]
fn segments_roll_and_consumed_ones_are_deleted() {
    let dir = TempDir::new().unwrap();
    let options = options(1000);
    let (mut queue, _) = open(&dir, &options);
    // 8-byte header + two batches of two 227-byte records = 916 bytes per segment.
    let all = plains(0..24, 200);
    for batch in all.chunks(2) {
        queue.append(batch).unwrap();
    }
    assert_eq!(segments(&dir).len(), 6);
    for n in 0..5 {
        assert_eq!(len_of(&segment(&dir, n)), 916);
    }

    let mut out = Vec::new();
    assert_eq!(queue.pop(4, &mut out).unwrap(), 4);
    assert_eq!(
        segments(&dir).len(),
        6,
        "segment 0 is not known to be done yet"
    );
    assert_eq!(queue.pop(1, &mut out).unwrap(), 1);
    assert_eq!(segments(&dir).len(), 5, "segment 0 deleted once read");
    assert!(!segment(&dir, 0).exists());
    out.extend(pop_all(&mut queue));
    assert_eq!(out, all);
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000005.dat")]);

    // A record larger than a segment gets a segment of its own.
    let big = plain(100, 1500);
    queue.append([&big]).unwrap();
    assert_eq!(len_of(&segment(&dir, 6)), 8 + 27 + 1500);
    let small = plain(101, 10);
    queue.append([&small]).unwrap();
    assert_eq!(len_of(&segment(&dir, 7)), 8 + 27 + 10);
    assert_eq!(pop_all(&mut queue), [big, small]);
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000007.dat")]);
    queue.sync().unwrap();
    drop(queue);
    let (queue, report) = open(&dir, &options);
    assert_eq!(queue.depth(), 0);
    assert!(!report.repaired());
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
    assert_eq!(pop_all(&mut queue), all);
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
    assert_eq!(pop_all(&mut queue), all[..5]);

    // The queue goes on normally, and the repair was made durable.
    let more = varieds(10..12, 50);
    queue.append(&more).unwrap();
    assert_eq!(pop_all(&mut queue), more);
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
    assert_eq!(pop_all(&mut queue), all[..2]);
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
    assert_eq!(pop_all(&mut queue), expected);
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

fn bad_files(dir: &TempDir) -> Vec<String> {
    files_ending(dir, ".bad")
}

#[test]
fn a_corrupt_record_skips_the_rest_of_its_segment() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    // Damage the body of the second record of segment 1 (record 5).
    flip_byte(&segment(&dir, 1), (8 + PLAIN_200 + 27 + 100) as usize);

    let mut out = Vec::new();
    assert_eq!(queue.pop(5, &mut out).unwrap(), 5);
    assert_eq!(out, all[..5]);
    assert_eq!(queue.corrupt_segments(), 0);
    // The next pop meets the damage, skips records 5 to 7 and goes on with segment 2.
    assert_eq!(queue.pop(1, &mut out).unwrap(), 1);
    assert_eq!(out.last(), Some(&all[8]));
    assert_eq!(queue.corrupt_segments(), 1);
    assert_eq!(queue.depth(), 3, "depth counted again after the skip");
    assert_eq!(
        bad_files(&dir),
        [format!("{NAME}.diskqueue.000001.dat.bad")]
    );
    out.extend(pop_all(&mut queue));
    let mut expected = all[..5].to_vec();
    expected.extend_from_slice(&all[8..]);
    assert_eq!(out, expected);
    assert_eq!(queue.depth(), 0);

    queue.sync().unwrap();
    drop(queue);
    let (queue, report) = open(&dir, &options(1000));
    assert_eq!(report.metadata, MetadataState::Loaded);
    assert_eq!(queue.depth(), 0);
}

#[test]
fn a_corrupt_record_in_the_segment_being_written() {
    let dir = TempDir::new().unwrap();
    let options = options(1 << 20);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..5, 200);
    queue.append(&all).unwrap();
    flip_byte(&segment(&dir, 0), (8 + 2 * PLAIN_200 + 40) as usize);

    assert_eq!(pop_all(&mut queue), all[..2]);
    assert_eq!(queue.corrupt_segments(), 1);
    assert_eq!(queue.depth(), 0);
    assert_eq!(bad_files(&dir).len(), 1);
    // Writing goes on in a new segment.
    let more = plains(10..13, 200);
    queue.append(&more).unwrap();
    assert_eq!(queue.depth(), 3);
    assert_eq!(pop_all(&mut queue), more);
    drop(queue);
    let (mut queue, _) = open(&dir, &options);
    assert_eq!(queue.depth(), 3, "pops since the last sync come again");
    assert_eq!(pop_all(&mut queue), more);
}

/// Damages segment 1 of three, then checks that segments 0 and 2 are read, plus the first
/// `kept` records of segment 1.
fn check_damaged_middle_segment(damage: impl FnOnce(&Path), kept: usize, reopen: bool) {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    if reopen {
        drop(queue);
        damage(&segment(&dir, 1));
        let (reopened, report) = open(&dir, &options(1000));
        assert_eq!(report.metadata, MetadataState::Loaded);
        assert_eq!(report.depth, 12);
        queue = reopened;
    } else {
        damage(&segment(&dir, 1));
    }
    let got = pop_all(&mut queue);
    let mut expected = all[..4 + kept].to_vec();
    expected.extend_from_slice(&all[8..]);
    assert_eq!(got, expected);
    assert_eq!(queue.depth(), 0);
    assert_eq!(queue.corrupt_segments(), 1);
    assert_eq!(bad_files(&dir).len(), 1);
    assert_eq!(segments(&dir), [format!("{NAME}.diskqueue.000002.dat")]);
}

#[test]
fn a_garbage_segment_is_moved_aside() {
    for reopen in [false, true] {
        check_damaged_middle_segment(|path| fs::write(path, noise(916, 42)).unwrap(), 0, reopen);
    }
}

#[test]
fn a_segment_with_a_truncated_header_is_moved_aside() {
    for reopen in [false, true] {
        check_damaged_middle_segment(|path| truncate(path, 5), 0, reopen);
    }
}

#[test]
fn a_segment_ending_in_a_truncated_record_header_keeps_its_whole_records() {
    for reopen in [false, true] {
        check_damaged_middle_segment(|path| truncate(path, 8 + PLAIN_200 + 4), 1, reopen);
    }
}

#[test]
fn a_corrupt_length_is_caught_before_reading_the_body() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    // Record 4's length field claims far more than --max-msg-size.
    let path = segment(&dir, 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    fs::write(&path, bytes).unwrap();
    let mut expected = all[..4].to_vec();
    expected.extend_from_slice(&all[8..]);
    assert_eq!(pop_all(&mut queue), expected);
    assert_eq!(queue.corrupt_segments(), 1);
}

#[test]
fn corrupt_or_missing_metadata_is_rebuilt_from_the_segments() {
    for damage in ["garbage", "short", "missing"] {
        let dir = TempDir::new().unwrap();
        let (mut queue, all) = three_segments(&dir);
        let mut out = Vec::new();
        queue.pop(5, &mut out).unwrap();
        queue.sync().unwrap();
        drop(queue);
        assert!(!segment(&dir, 0).exists());
        match damage {
            "garbage" => fs::write(meta_path(&dir), noise(52, 7)).unwrap(),
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
        assert_eq!(pop_all(&mut queue), all[4..]);
        queue.sync().unwrap();
        drop(queue);
        let (_, report) = open(&dir, &options(1000));
        assert_eq!(report.metadata, MetadataState::Loaded);
        assert_eq!(report.depth, 0);
    }
}

#[test]
fn rebuilding_metadata_moves_a_corrupt_middle_segment_aside() {
    let dir = TempDir::new().unwrap();
    let (queue, all) = three_segments(&dir);
    drop(queue);
    flip_byte(&segment(&dir, 1), (8 + 2 * PLAIN_200 + 60) as usize);
    fs::write(meta_path(&dir), b"not metadata").unwrap();

    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.metadata, MetadataState::Corrupt);
    assert_eq!(report.corrupt_segments, 1);
    assert_eq!(report.depth, 10);
    assert_eq!(queue.corrupt_segments(), 1);
    let bad = bad_files(&dir);
    assert_eq!(bad, [format!("{NAME}.diskqueue.000001.dat.bad")]);
    assert_eq!(len_of(&dir.path().join(&bad[0])), 2 * PLAIN_200);
    let mut expected = all[..6].to_vec();
    expected.extend_from_slice(&all[8..]);
    assert_eq!(pop_all(&mut queue), expected);
}

#[test]
fn metadata_that_does_not_match_the_files_is_rebuilt_from_the_read_position() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    let mut out = Vec::new();
    queue.pop(5, &mut out).unwrap();
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
    assert_eq!(pop_all(&mut queue), all[5..8]);
}

#[test]
fn stale_consumed_segments_are_removed_at_open() {
    let dir = TempDir::new().unwrap();
    let (mut queue, all) = three_segments(&dir);
    let mut out = Vec::new();
    queue.pop(5, &mut out).unwrap();
    drop(queue);
    // As if the process died after the metadata moved on but before the delete.
    fs::write(segment(&dir, 0), b"old").unwrap();
    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.stale_segments_removed, 1);
    assert!(!segment(&dir, 0).exists());
    assert_eq!(pop_all(&mut queue), all[4..]);
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
    // Reads still work; syncs fail.
    let mut out = Vec::new();
    assert_eq!(queue.pop(2, &mut out).unwrap(), 2);
    assert_eq!(out, a[..2]);
    assert!(queue.sync().is_err());

    faults.set_failing(false);
    let c = varieds(20..23, 100);
    queue.append(&c).unwrap();
    queue.sync().unwrap();
    drop(queue);
    let (mut queue, report) = open(&dir, &options);
    assert!(!report.repaired());
    let mut expected = a[2..].to_vec();
    expected.extend_from_slice(&c);
    assert_eq!(pop_all(&mut queue), expected);
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
    assert_eq!(pop_all(&mut queue), expected);
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
    assert_eq!(pop_all(&mut queue), batch[..1]);
}

#[test]
fn a_queued_200_byte_message_takes_at_most_240_bytes_on_disk() {
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
    assert!(per_message <= 240.0, "{per_message} bytes per message");
    assert!(per_message < 228.0, "{per_message} bytes per message");

    assert_eq!(pop_all(&mut queue).len(), count as usize);
    queue.sync().unwrap();
    assert_eq!(
        segments(&dir).len(),
        1,
        "only the segment being written is left"
    );
}

#[test]
fn one_write_per_batch_large_reads_and_shared_bodies() {
    let dir = TempDir::new().unwrap();
    let (mut queue, _) = open(&dir, &options(1 << 20));
    for batch in plains(0..1000, 200).chunks(200) {
        queue.append(batch).unwrap();
    }
    assert_eq!(queue.io.writes, 5);
    let mut out = Vec::with_capacity(200);
    assert_eq!(queue.pop(200, &mut out).unwrap(), 200);
    assert_eq!(queue.io.reads, 1);
    // Every body of the batch points into the same read buffer.
    let base = out[0].body.as_ptr() as usize;
    for (k, record) in out.iter().enumerate() {
        assert_eq!(record.body.as_ptr() as usize - base, k * PLAIN_200 as usize);
    }
    out.clear();
    while queue.pop(200, &mut out).unwrap() > 0 {}
    assert_eq!(out.len(), 800);
    // 227,008 bytes in 128 KiB reads.
    assert_eq!(queue.io.reads, 2);
}

#[test]
fn sync_is_due_after_sync_every_operations() {
    let dir = TempDir::new().unwrap();
    let options = DiskQueueOptions {
        sync_every: 3,
        ..options(1 << 20)
    };
    let (mut queue, _) = open(&dir, &options);
    assert!(!queue.sync_due());
    queue.append(&plains(0..2, 10)).unwrap();
    assert!(!queue.sync_due());
    let mut out = Vec::new();
    queue.pop(1, &mut out).unwrap();
    assert!(queue.sync_due());
    queue.sync().unwrap();
    assert!(!queue.sync_due());
}

#[test]
fn empty_deletes_the_segments_and_the_queue_goes_on() {
    let dir = TempDir::new().unwrap();
    let (mut queue, _) = three_segments(&dir);
    let mut out = Vec::new();
    queue.pop(2, &mut out).unwrap();
    queue.empty().unwrap();
    assert_eq!(queue.depth(), 0);
    assert!(segments(&dir).is_empty());
    assert_eq!(queue.pop(10, &mut out).unwrap(), 0);
    let more = plains(50..53, 200);
    queue.append(&more).unwrap();
    drop(queue);
    let (mut queue, report) = open(&dir, &options(1000));
    assert_eq!(report.depth, 3);
    assert_eq!(pop_all(&mut queue), more);
}

#[test]
fn delete_removes_every_file_of_the_queue_and_only_those() {
    let dir = TempDir::new().unwrap();
    let (mut other, _) = DiskQueue::open(dir.path(), "topic", options(1000)).unwrap();
    other.append(&plains(0..3, 10)).unwrap();
    other.sync().unwrap();
    let (queue, _) = three_segments(&dir);
    fs::write(
        dir.path().join(format!("{NAME}.diskqueue.000000.dat.bad")),
        b"x",
    )
    .unwrap();
    queue.delete().unwrap();
    let left = files_ending(&dir, "");
    assert_eq!(
        left,
        ["topic.diskqueue.000000.dat", "topic.diskqueue.meta"].map(String::from)
    );
    assert_eq!(pop_all(&mut other), plains(0..3, 10));
}

#[test]
fn names_that_are_not_file_names_are_refused() {
    let dir = TempDir::new().unwrap();
    for name in ["", "a/b", ".."] {
        assert!(matches!(
            DiskQueue::open(dir.path(), name, options(1000)),
            Err(StorageError::InvalidName { .. })
        ));
    }
}

#[test]
fn random_damage_loses_only_the_damaged_segment() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    for round in 0..60 {
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
        match rand(4) {
            0 => {
                for _ in 0..=rand(3) {
                    flip_byte(&path, rand(len as u64) as usize);
                }
            }
            1 => truncate(&path, rand(len as u64)),
            2 => {
                let mut bytes = fs::read(&path).unwrap();
                let at = rand(len as u64) as usize;
                let n = (1 + rand(300) as usize).min(len - at);
                bytes[at..at + n].copy_from_slice(&noise(n, round + 1));
                fs::write(&path, bytes).unwrap();
            }
            _ => {
                let mut bytes = fs::read(&path).unwrap();
                bytes.extend(noise(1 + rand(400) as usize, round + 7));
                fs::write(&path, bytes).unwrap();
            }
        }
        if rand(2) == 0 {
            fs::write(meta_path(&dir), noise(52, round)).unwrap();
        }

        let (mut queue, _) = open(&dir, &options(1000));
        let got = pop_all(&mut queue);
        assert_eq!(queue.depth(), 0, "round {round}");
        // In order, each one appended, none of the undamaged segments missing.
        let mut next = 0;
        for record in &got {
            let i = all[next..]
                .iter()
                .position(|r| r == record)
                .unwrap_or_else(|| panic!("round {round}: unknown or out-of-order record"));
            next += i + 1;
        }
        for (i, record) in all.iter().enumerate() {
            if i as u64 / 4 != damaged {
                assert!(got.contains(record), "round {round}: record {i} lost");
            }
        }
        queue.sync().unwrap();
        drop(queue);
        let (queue, report) = open(&dir, &options(1000));
        assert_eq!(report.depth, 0, "round {round}");
        assert_eq!(queue.depth(), 0);
    }
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// Bodies of these lengths, some deferred, some with ids that are not hex.
    Append(Vec<(usize, bool, bool)>),
    Pop(usize),
    Sync,
    /// Drop without syncing (a process crash) and open again.
    Reopen,
    /// An append while the fault switch is on.
    FailedAppend(usize),
    Empty,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec((0usize..400, any::<bool>(), prop::bool::weighted(0.2)), 1..8)
            .prop_map(Op::Append),
        8 => (1usize..12).prop_map(Op::Pop),
        2 => Just(Op::Sync),
        2 => Just(Op::Reopen),
        1 => (1usize..5).prop_map(Op::FailedAppend),
        1 => Just(Op::Empty),
    ]
}

fn model_record(i: u64, (len, deferred, raw): (usize, bool, bool)) -> DiskRecord {
    let mut record = plain(i, len);
    if deferred {
        record.due_unix_ms = 1_800_000_000_000 + i as i64;
    }
    if raw {
        record.id = raw_id(i);
    }
    record
}

/// Runs `ops` against a disk queue and a `VecDeque`. The model holds the records from the last
/// read position known to be durable; `popped` of them have been handed out since. After a
/// crash the queue may hand some of those out again, never others, and never lose one.
fn run_model(max_bytes_per_file: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = TempDir::new().unwrap();
    let options = options(max_bytes_per_file);
    let faults = options.faults.clone();
    let (mut queue, _) = open(&dir, &options);
    let mut model: VecDeque<DiskRecord> = VecDeque::new();
    let mut popped = 0usize;
    let mut next = 0u64;
    let mut batch = |specs: &[(usize, bool, bool)]| -> Vec<DiskRecord> {
        specs
            .iter()
            .map(|&spec| {
                next += 1;
                model_record(next, spec)
            })
            .collect()
    };
    for op in ops {
        match op {
            Op::Append(specs) => {
                let records = batch(&specs);
                queue.append(&records).unwrap();
                model.extend(records);
            }
            Op::Pop(max) => {
                let mut out = Vec::new();
                let n = queue.pop(max, &mut out).unwrap();
                let expected: Vec<DiskRecord> =
                    model.iter().skip(popped).take(max).cloned().collect();
                prop_assert_eq!(&out, &expected);
                popped += n;
            }
            Op::Sync => {
                queue.sync().unwrap();
                model.drain(..popped);
                popped = 0;
            }
            Op::Reopen => {
                drop(queue);
                let (reopened, report) = open(&dir, &options);
                queue = reopened;
                prop_assert_eq!(report.metadata, MetadataState::Loaded);
                prop_assert_eq!(report.torn_segments, 0);
                prop_assert_eq!(report.corrupt_segments, 0);
                let depth = queue.depth() as usize;
                prop_assert!(depth <= model.len());
                let durable_read = model.len() - depth;
                prop_assert!(durable_read <= popped);
                model.drain(..durable_read);
                popped = 0;
            }
            Op::FailedAppend(n) => {
                let records = batch(&vec![(150, false, false); n]);
                faults.set_failing(true);
                let result = queue.append(&records);
                faults.set_failing(false);
                prop_assert!(result.is_err());
            }
            Op::Empty => {
                queue.empty().unwrap();
                model.clear();
                popped = 0;
            }
        }
        prop_assert_eq!(queue.depth() as usize, model.len() - popped);
    }
    let mut out = Vec::new();
    while queue.pop(100, &mut out).unwrap() > 0 {}
    let rest: Vec<DiskRecord> = model.iter().skip(popped).cloned().collect();
    prop_assert_eq!(out, rest);
    prop_assert_eq!(queue.depth(), 0);
    queue.sync().unwrap();
    prop_assert!(segments(&dir).len() <= 1, "{:?}", segments(&dir));
    prop_assert!(bad_files(&dir).is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=1000 for a longer run.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn disk_queue_behaves_like_a_fifo(
        max_bytes_per_file in 200u64..3000,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_model(max_bytes_per_file, ops)?;
    }
}

#[test]
fn held_records_come_back_after_a_crash_until_released() {
    let dir = TempDir::new().unwrap();
    // Small segments, so records span several and the held floor matters.
    let options = options(2048);
    let (mut queue, _) = open(&dir, &options);
    let all = plains(0..40, 100);
    for batch in all.chunks(4) {
        queue.append(batch).unwrap();
    }
    let (mut out, mut held) = (Vec::new(), Vec::new());
    assert_eq!(queue.pop_held(30, &mut out, &mut held).unwrap(), 30);
    assert_eq!(held.len(), 30);
    // Everything handed out is finished except record 20 (in the second segment: about 16
    // records fit in one) and the last three.
    for (i, segment) in held.iter().enumerate() {
        if i != 20 && i < 27 {
            queue.release(*segment);
        }
    }
    queue.sync().unwrap();
    let kept_segments = segments(&dir).len();
    assert!(kept_segments > 1, "the held record's segment is kept");
    drop(queue); // a crash: no clean shutdown

    let (mut queue, report) = open(&dir, &options);
    let again = pop_all(&mut queue);
    assert_eq!(report.depth, again.len() as u64);
    // Read again from the segment of record 20: it, the unreleased tail and the never
    // popped records all come back; nothing is lost.
    for wanted in [20usize, 27, 28, 29, 30, 39] {
        assert!(again.contains(&all[wanted]), "record {wanted} lost");
    }
    assert!(
        !again.contains(&all[0]),
        "segments before the held one are gone"
    );
}

#[test]
fn releasing_everything_lets_the_read_position_and_segments_go() {
    let dir = TempDir::new().unwrap();
    let options = options(2048);
    let (mut queue, _) = open(&dir, &options);
    for batch in plains(0..40, 100).chunks(4) {
        queue.append(batch).unwrap();
    }
    let (mut out, mut held) = (Vec::new(), Vec::new());
    queue.pop_held(40, &mut out, &mut held).unwrap();
    queue.sync().unwrap();
    assert!(segments(&dir).len() > 1);
    for segment in held {
        queue.release(segment);
    }
    queue.sync().unwrap();
    assert_eq!(
        segments(&dir).len(),
        1,
        "only the segment being written is left"
    );
    drop(queue);
    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 0);
    assert!(pop_all(&mut queue).is_empty());
}

#[test]
fn sync_data_makes_writes_durable_without_touching_the_metadata() {
    let dir = TempDir::new().unwrap();
    let options = options(2048);
    let (mut queue, _) = open(&dir, &options);
    queue.append(&plains(0..4, 100)).unwrap();
    queue.sync().unwrap();
    let meta_before = std::fs::read(meta_path(&dir)).unwrap();
    let all = plains(4..40, 100);
    for batch in all.chunks(4) {
        queue.append(batch).unwrap();
    }
    queue.sync_data().unwrap();
    assert_eq!(std::fs::read(meta_path(&dir)).unwrap(), meta_before);
    assert!(segments(&dir).len() > 1, "new segments were created");
    drop(queue); // a crash after the fsync
    let (mut queue, report) = open(&dir, &options);
    assert_eq!(report.depth, 40);
    assert_eq!(pop_all(&mut queue)[4..], all[..]);
}
