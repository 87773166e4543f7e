//! A channel's side of dead-lettering and redrive: its maximum of attempts, the messages
//! leaving it for the dead-letter topic, and moves out of it that keep each message the
//! channel's (stored by a clean shutdown, on disk until finished) until its copy is stored
//! elsewhere. See [`crate::queue::dead_letter`] for the semantics.

use super::{Channel, State};
use crate::persist::ChannelMeta;
use crate::queue::dead_letter::{DeadLetterConfig, RedriveError, default_topic};
use crate::queue::envelope::{Failure, Origin};
use crate::queue::message::{Msg, QueuedMessage};
use crate::queue::unix_nanos;
use crate::stats::DeadLetterStats;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;

/// How long dead letters wait after a failed move before the next try.
const RETRY: Duration = Duration::from_secs(1);

/// A message over the limit, waiting for the timer task to move it.
#[derive(Debug)]
pub(super) struct Dying {
    msg: Msg,
    why: Failure,
    /// When its last delivery ended, ns since the Unix epoch.
    at: i64,
}

impl Dying {
    pub(super) fn new(msg: Msg, why: Failure) -> Dying {
        Dying {
            msg,
            why,
            at: unix_nanos(),
        }
    }
}

#[derive(Debug)]
pub(super) struct DeadState {
    /// `--max-attempts`, which the channel follows unless it has its own.
    default_max_attempts: u16,
    config: DeadLetterConfig,
    /// The maximum in force (0: none).
    pub(super) max_attempts: u16,
    pub(super) dying: Vec<Dying>,
    /// After a failed move: when to try again.
    retry_at: Option<Instant>,
    /// Messages being moved out, by move.
    leaving: Vec<(u64, Msg)>,
    moves: u64,
}

impl DeadState {
    pub(super) fn new(default_max_attempts: u16) -> DeadState {
        DeadState {
            default_max_attempts,
            config: DeadLetterConfig::default(),
            max_attempts: default_max_attempts,
            dying: Vec::new(),
            retry_at: None,
            leaving: Vec::new(),
            moves: 0,
        }
    }

    /// Whether `msg` must not be delivered again. Dead letters never are dead-lettered again.
    pub(super) fn over_limit(&self, msg: &Msg) -> bool {
        self.max_attempts > 0 && msg.attempts >= self.max_attempts && !msg.dead_letter
    }

    /// When the timer task must wake to try a failed move again.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| !self.dying.is_empty())
    }

    /// Messages on their way out.
    pub(super) fn len(&self) -> usize {
        self.dying.len() + self.leaving.len()
    }

    /// Forgets the messages on their way out (the channel is emptied or deleted).
    pub(super) fn clear(&mut self) {
        self.dying.clear();
        self.leaving.clear();
        self.retry_at = None;
    }

    /// Takes every message on its way out, for a shutdown to store them.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Msg> + '_ {
        let DeadState { dying, leaving, .. } = self;
        let dying = dying.drain(..).map(|d| d.msg);
        dying.chain(leaving.drain(..).map(|(_, msg)| msg))
    }

    fn start_move(&mut self, msgs: impl IntoIterator<Item = Msg>) -> u64 {
        self.moves += 1;
        let id = self.moves;
        self.leaving.extend(msgs.into_iter().map(|msg| (id, msg)));
        id
    }

    /// The messages of move `id`, in order; none when a shutdown, empty or delete took them.
    fn end_move(&mut self, id: u64) -> Vec<Msg> {
        let (ours, others) = std::mem::take(&mut self.leaving)
            .into_iter()
            .partition(|(move_id, _)| *move_id == id);
        self.leaving = others;
        ours.into_iter().map(|(_, msg)| msg).collect()
    }

    fn configure(&mut self, config: DeadLetterConfig) {
        self.max_attempts = config.max_attempts.unwrap_or(self.default_max_attempts);
        self.config = config;
    }
}

/// Dead letters on their way to their topic, outside the channel's lock.
#[derive(Debug)]
pub(super) struct DeadBatch {
    move_id: u64,
    topic: String,
    copies: Vec<Msg>,
}

impl Channel {
    /// The dead letters waiting, as copies for their topic; they stay the channel's until
    /// [`Channel::dead_letter`] has stored the copies.
    pub(super) fn start_dead_letters(&self, st: &mut State, now: Instant) -> Option<DeadBatch> {
        let dead = &mut st.dead;
        if dead.dying.is_empty() || dead.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        dead.retry_at = None;
        let topic = self.dead_letter_topic_of(dead);
        let dying = std::mem::take(&mut dead.dying);
        let copies = dying
            .iter()
            .map(|d| {
                d.msg.dead_lettered(&Origin {
                    topic: self.topic_name.clone(),
                    channel: self.name.clone(),
                    attempts: d.msg.attempts,
                    failure: d.why,
                    failed_at: d.at,
                })
            })
            .collect();
        let move_id = dead.start_move(dying.into_iter().map(|d| d.msg));
        Some(DeadBatch {
            move_id,
            topic,
            copies,
        })
    }

    /// Stores the copies in the dead-letter topic, then lets the originals go: their disk
    /// records are finished once the copies are durable in `--sync-publish` mode. When the
    /// copies cannot be stored, the originals wait and are tried again.
    pub(super) fn dead_letter(&self, batch: DeadBatch) {
        let stored = self
            .settings
            .dead_letters
            .store(&batch.topic, &batch.copies);
        let mut st = self.lock();
        let originals = st.dead.end_move(batch.move_id);
        match stored {
            Ok(()) => {
                let count = originals.len();
                for mut msg in originals {
                    self.settings.finish(&mut st.disk, &mut msg, true);
                }
                drop(st);
                if self.settings.sync_publish {
                    // The originals go once a sync pass made the copies durable: start one now
                    // rather than at --sync-timeout, so a crash repeats fewer dead letters.
                    self.settings.commits.wanted.notify_one();
                }
                self.dead_lettered_count.fetch_add(count as u64, Relaxed);
                self.settings.dead_letters.counted();
                tracing::info!(
                    topic = %self.topic_name,
                    channel = %self.name,
                    dead_letter_topic = %batch.topic,
                    count,
                    "messages over the maximum of attempts moved to the dead-letter topic",
                );
            }
            Err(error) => {
                tracing::warn!(
                    topic = %self.topic_name,
                    channel = %self.name,
                    dead_letter_topic = %batch.topic,
                    %error,
                    "cannot store dead letters; trying again in {}s",
                    RETRY.as_secs(),
                );
                let now_dying = originals
                    .into_iter()
                    .zip(batch.copies.iter().map(Msg::origin));
                for (msg, origin) in now_dying {
                    let (why, at) = origin.map_or((Failure::OverLimit, unix_nanos()), |o| {
                        (o.failure, o.failed_at)
                    });
                    st.dead.dying.push(Dying { msg, why, at });
                }
                st.dead.retry_at = Some(Instant::now() + RETRY);
            }
        }
    }

    /// Moves up to `max` queued dead letters back into the channels they came from, which
    /// `find` looks up; returns how many were moved. Each goes back with its ID, timestamp
    /// and body and no attempts. A batch with a message that has no origin, or whose channel
    /// is gone, is not moved at all.
    pub(crate) fn redrive(
        &self,
        max: usize,
        find: impl Fn(&Origin) -> Option<Arc<Channel>>,
    ) -> Result<usize, RedriveError> {
        let (move_id, msgs) = {
            let mut st = self.lock();
            self.fill_queue(&mut st, max);
            let take = st.queue.len().min(max);
            let msgs: Vec<Msg> = st.queue.drain(..take).collect();
            (st.dead.start_move(msgs.iter().cloned()), msgs)
        };
        if msgs.is_empty() {
            return Ok(0);
        }
        let moved = self.copy_back(&msgs, find);
        let mut st = self.lock();
        let originals = st.dead.end_move(move_id);
        match moved {
            Ok(()) => {
                for mut msg in originals {
                    self.settings.finish(&mut st.disk, &mut msg, true);
                }
                Ok(msgs.len())
            }
            Err(e) => {
                // Back to the front, in order: older than everything queued.
                for msg in originals.into_iter().rev() {
                    st.queue.push_front(msg);
                }
                let now = Instant::now();
                self.dispatch(&mut st, now);
                Err(e)
            }
        }
    }

    /// Puts the redriven copies of `msgs` into their channels, a run of messages for the same
    /// channel at a time; checks every destination first.
    fn copy_back(
        &self,
        msgs: &[Msg],
        find: impl Fn(&Origin) -> Option<Arc<Channel>>,
    ) -> Result<(), RedriveError> {
        let mut runs: Vec<(Arc<Channel>, Vec<Msg>)> = Vec::new();
        for msg in msgs {
            let origin = msg.origin().ok_or(RedriveError::NotDeadLetter {
                id: msg.id.to_string(),
            })?;
            let channel = find(&origin).ok_or_else(|| RedriveError::OriginGone {
                topic: origin.topic.clone(),
                channel: origin.channel.clone(),
            })?;
            match runs.last_mut() {
                Some((last, run)) if Arc::ptr_eq(last, &channel) => run.push(msg.redriven()),
                _ => runs.push((channel, vec![msg.redriven()])),
            }
        }
        let _copying = self
            .settings
            .dead_letters
            .copying()
            .ok_or(RedriveError::Closed)?;
        for (channel, run) in runs {
            if !channel.put(&run, None)? {
                return Err(RedriveError::OriginGone {
                    topic: channel.topic_name.clone(),
                    channel: channel.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The first `max` queued messages, without taking them (see [`Channel::fill_queue`]).
    pub(crate) fn peek(&self, max: usize) -> Vec<QueuedMessage> {
        let mut st = self.lock();
        self.fill_queue(&mut st, max);
        st.queue.iter().take(max).map(QueuedMessage::of).collect()
    }

    /// Reads records from disk until `max` messages are queued in memory or none are left;
    /// they stay on disk until finished, and in order.
    fn fill_queue(&self, st: &mut State, max: usize) {
        let now = Instant::now();
        while st.queue.len() < max {
            let want = max - st.queue.len();
            if self.read_disk(st, want, now) == 0 {
                break;
            }
        }
    }

    /// The channel's own dead-letter settings.
    pub(crate) fn dead_letter_config(&self) -> DeadLetterConfig {
        self.lock().dead.config.clone()
    }

    /// Sets the channel's own dead-letter settings. A lower maximum applies to what is queued
    /// too: those messages are dead-lettered as they come up for delivery.
    pub(crate) fn configure_dead_letters(&self, config: DeadLetterConfig) {
        let mut st = self.lock();
        st.dead.configure(config);
        self.dispatch(&mut st, Instant::now());
    }

    /// The settings and count the metadata kept over a restart.
    pub(crate) fn restore_dead_letters(&self, config: DeadLetterConfig, count: u64) {
        self.configure_dead_letters(config);
        self.dead_lettered_count.store(count, Relaxed);
    }

    /// The limit in force, the dead-letter topic and the count, as `/channel/config` shows
    /// them.
    pub(crate) fn dead_letter_settings(&self) -> DeadLetterStats {
        self.dead_letter_figures(&self.lock())
    }

    /// For `/stats`: shown once a limit is in force or anything was dead-lettered.
    pub(super) fn dead_letter_stats(&self, st: &State) -> Option<DeadLetterStats> {
        let figures = self.dead_letter_figures(st);
        (figures.max_attempts > 0 || figures.dead_lettered_count > 0).then_some(figures)
    }

    fn dead_letter_figures(&self, st: &State) -> DeadLetterStats {
        DeadLetterStats {
            max_attempts: st.dead.max_attempts,
            dead_letter_topic: self.dead_letter_topic_of(&st.dead),
            dead_lettered_count: self.dead_lettered_count.load(Relaxed),
        }
    }

    fn dead_letter_topic_of(&self, dead: &DeadState) -> String {
        match &dead.config.topic {
            Some(topic) => topic.clone(),
            None => default_topic(&self.topic_name, &self.name),
        }
    }

    /// What the metadata file records of the channel.
    pub(crate) fn meta(&self) -> ChannelMeta {
        let st = self.lock();
        ChannelMeta {
            name: self.name.clone(),
            paused: st.paused,
            max_attempts: st.dead.config.max_attempts,
            dead_letter_topic: st.dead.config.topic.clone(),
            dead_lettered: self.dead_lettered_count.load(Relaxed),
        }
    }
}
