//! The stall watchdog: an OS thread that reads every probe and activity, decides what is
//! stalled, and publishes the verdict for `/health`.

use crate::{Activity, DeadlockReport, Probe, now_ms};
use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type Labels = Vec<(String, String)>;

/// One queue as `/health` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueHealth {
    /// Queue name.
    pub queue: String,
    /// Items waiting or in progress.
    pub depth: u64,
    /// Age of the oldest item, seconds.
    pub oldest_age_seconds: Option<f64>,
    /// The progress counter.
    pub progress: u64,
    /// Seconds since the progress counter last moved while the queue was non-empty.
    pub no_progress_seconds: f64,
    /// Whether the watchdog judges it (queues nothing consumes yet are only reported).
    pub watched: bool,
    /// For a queue that lives in the database: seconds since its depth was last read
    /// (`null` for in-memory queues, always current). A read older than the stall time
    /// counts as a stall: the database is not answering.
    #[serde(default)]
    pub sample_age_seconds: Option<f64>,
    /// Non-empty without progress for longer than the stall time.
    pub stalled: bool,
}

/// A stalled queue, named in `/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StalledQueue {
    /// Queue name.
    pub queue: String,
    /// Items waiting.
    pub depth: u64,
    /// Seconds without progress.
    pub no_progress_seconds: f64,
}

/// What one worker is doing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerReport {
    /// Worker name.
    pub worker: String,
    /// What it is doing.
    pub doing: String,
    /// For how long, seconds.
    pub for_seconds: f64,
    /// Its thread died (a panic): its work has stopped; `/health` is red.
    #[serde(default)]
    pub died: bool,
}

/// A fault a component reports while it lasts (disk full, storage I/O errors): `/health`
/// is red and names it until the component clears it. Why: some faults stop work without
/// any queue backing up (SMTP refuses new mail while the disk is full, so the spool stays
/// empty), so the stall detector alone would call the server healthy.
pub struct Condition {
    name: String,
    state: ArcSwap<Option<(String, i64)>>,
}

impl Condition {
    /// The condition's name (`disk`, `storage`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Raises the condition (or updates its detail); returns true if it was clear.
    pub fn raise(&self, detail: impl Into<String>) -> bool {
        let detail = detail.into();
        let previous = self.state.load_full();
        let since = previous
            .as_ref()
            .as_ref()
            .map_or_else(now_ms, |(_, at)| *at);
        self.state.store(Arc::new(Some((detail, since))));
        previous.is_none()
    }

    /// Clears the condition; returns true if it was raised.
    pub fn clear(&self) -> bool {
        self.state.swap(Arc::new(None)).is_some()
    }

    /// The detail and since when (Unix ms), while raised.
    pub fn current(&self) -> Option<(String, i64)> {
        (**self.state.load()).clone()
    }
}

/// A raised condition as `/health` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConditionReport {
    /// Its name (`disk`, `storage`).
    pub condition: String,
    /// What is wrong and what the server does about it.
    pub detail: String,
    /// For how long, seconds.
    pub for_seconds: f64,
}

/// A session blocking a runtime thread, or a runtime that stopped running tasks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlockedTask {
    /// "SMTP session", "IMAP session", ... or "runtime NAME".
    pub what: String,
    /// The client's address, for a session.
    pub peer: Option<String>,
    /// The command it was running, for a session.
    pub doing: Option<String>,
    /// Seconds the poll has run (or since the runtime's last heartbeat).
    pub seconds: f64,
}

/// The watchdog's verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Health {
    /// No stalled queue and no deadlock.
    pub healthy: bool,
    /// The stalled queues.
    pub stalled: Vec<StalledQueue>,
    /// Every queue.
    pub queues: Vec<QueueHealth>,
    /// Every worker.
    pub workers: Vec<WorkerReport>,
    /// Sessions blocking a runtime thread and runtimes that stopped (see `tasks`).
    #[serde(default)]
    pub blocked: Vec<BlockedTask>,
    /// Deadlock cycles found so far.
    pub deadlocks: u64,
    /// Faults reported by components while they last (disk full, storage I/O errors).
    #[serde(default)]
    pub conditions: Vec<ConditionReport>,
    /// When this verdict was reached (Unix ms).
    pub checked_at_ms: i64,
}

/// Every probe and activity of the server, and the watchdog's latest verdict.
pub struct Registry {
    probes: ArcSwap<Vec<Arc<Probe>>>,
    activities: ArcSwap<Vec<Arc<Activity>>>,
    conditions: ArcSwap<Vec<Arc<Condition>>>,
    health: ArcSwap<Health>,
    deadlocks: ArcSwap<Option<Arc<DeadlockReport>>>,
    stalls: Family<Labels, Counter>,
    depth: Family<Labels, Gauge>,
    progress: Family<Labels, Gauge>,
    deadlock_count: Gauge,
    tasks: Arc<crate::Tasks>,
    /// Ids of blocked tasks already logged (leaf lock, watchdog thread only).
    reported: crate::RankedMutex<std::collections::HashSet<u64>>,
    blocked_count: Counter,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            probes: ArcSwap::from_pointee(Vec::new()),
            activities: ArcSwap::from_pointee(Vec::new()),
            conditions: ArcSwap::from_pointee(Vec::new()),
            health: ArcSwap::from_pointee(Health {
                healthy: true,
                ..Health::default()
            }),
            deadlocks: ArcSwap::from_pointee(None),
            stalls: Family::default(),
            depth: Family::default(),
            progress: Family::default(),
            deadlock_count: Gauge::default(),
            tasks: Arc::default(),
            reported: crate::RankedMutex::new(
                crate::rank::WATCHDOG_REPORTED,
                "watchdog reported tasks",
                std::collections::HashSet::new(),
            ),
            blocked_count: Counter::default(),
        }
    }
}

impl Registry {
    /// Watches a queue.
    pub fn add_probe(&self, probe: Arc<Probe>) {
        self.probes.rcu(|all| {
            let mut all: Vec<Arc<Probe>> = (**all).clone();
            all.push(probe.clone());
            all
        });
    }

    /// Lists a worker.
    pub fn add_activity(&self, activity: Arc<Activity>) {
        self.activities.rcu(|all| {
            let mut all: Vec<Arc<Activity>> = (**all).clone();
            all.push(activity.clone());
            all
        });
    }

    /// The condition called `name`, created (clear) on first use. Components keep the
    /// `Arc` and raise or clear it; the watchdog reads it at every check.
    pub fn condition(&self, name: &str) -> Arc<Condition> {
        if let Some(found) = self.conditions.load().iter().find(|c| c.name == name) {
            return found.clone();
        }
        let created = Arc::new(Condition {
            name: name.to_string(),
            state: ArcSwap::from_pointee(None),
        });
        let mut result = created.clone();
        self.conditions.rcu(|all| {
            if let Some(found) = all.iter().find(|c| c.name == name) {
                result = found.clone();
                return (**all).clone();
            }
            result = created.clone();
            let mut all: Vec<Arc<Condition>> = (**all).clone();
            all.push(created.clone());
            all
        });
        result
    }

    /// Forgets a worker that ended (a job thread).
    pub fn remove_activity(&self, activity: &Arc<Activity>) {
        self.activities.rcu(|all| {
            all.iter()
                .filter(|a| !Arc::ptr_eq(a, activity))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Includes the deadlock detector's findings in the verdict.
    pub fn set_deadlock_report(&self, report: Arc<DeadlockReport>) {
        self.deadlocks.store(Arc::new(Some(report)));
    }

    /// The watched sessions and runtime heartbeats.
    pub fn tasks(&self) -> &Arc<crate::Tasks> {
        &self.tasks
    }

    /// The latest verdict.
    pub fn health(&self) -> Arc<Health> {
        self.health.load_full()
    }

    /// The probe called `name`.
    pub fn probe(&self, name: &str) -> Option<Arc<Probe>> {
        self.probes
            .load()
            .iter()
            .find(|p| p.name() == name)
            .cloned()
    }

    /// Adds the watchdog's metrics to a Prometheus registry.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mailroom_watchdog_stalls",
            "Times a queue was found non-empty without progress for the stall time",
            self.stalls.clone(),
        );
        registry.register(
            "mailroom_watch_depth",
            "Items per watched queue",
            self.depth.clone(),
        );
        registry.register(
            "mailroom_watch_progress",
            "Progress counter per watched queue (items finished)",
            self.progress.clone(),
        );
        registry.register(
            "mailroom_watchdog_blocked_tasks",
            "Sessions found blocking a runtime thread (or runtimes without a heartbeat) for the stall time",
            self.blocked_count.clone(),
        );
        registry.register(
            "mailroom_deadlocks",
            "Deadlock cycles found by the detector",
            self.deadlock_count.clone(),
        );
    }
}

/// The watchdog thread.
pub struct Watchdog;

struct Track {
    progress: u64,
    since_ms: i64,
    stalled: bool,
}

impl Watchdog {
    /// Starts the watchdog on its own OS thread: every `interval` it samples every
    /// probe; a queue non-empty with no progress for `stall_after` is stalled.
    /// The thread ends once `stop` returns true.
    pub fn start(
        registry: Arc<Registry>,
        stall_after: Duration,
        interval: Duration,
        stop: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                // Database reads happen on a thread of their own, so this one only ever
                // reads atomics: its verdict stays fresh even while a sample is slow.
                let stopped = Arc::new(AtomicBool::new(false));
                let sampler = {
                    let (registry, stopped) = (registry.clone(), stopped.clone());
                    std::thread::Builder::new()
                        .name("watch-sampler".into())
                        .spawn(move || {
                            while !stopped.load(Ordering::Relaxed) {
                                for probe in registry.probes.load().iter() {
                                    probe.refresh();
                                }
                                std::thread::sleep(interval);
                            }
                        })
                };
                if let Err(e) = &sampler {
                    tracing::error!("cannot start the watchdog's sampler thread: {e}");
                }
                let mut tracks: HashMap<&'static str, Track> = HashMap::new();
                while !stop() {
                    check(&registry, &mut tracks, stall_after.as_millis() as i64);
                    std::thread::sleep(interval);
                }
                // Not joined: a sampler stuck in the database must not hold up shutdown.
                // Detached before it is told to stop, so it cannot be exiting while
                // detached (glibc's pthread_detach races with an exiting thread, see
                // docs/locking.md).
                drop(sampler);
                stopped.store(true, Ordering::Relaxed);
            })
    }
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

fn check(registry: &Registry, tracks: &mut HashMap<&'static str, Track>, stall_after_ms: i64) {
    let now = now_ms();
    let workers: Vec<WorkerReport> = registry
        .activities
        .load()
        .iter()
        .map(|a| {
            let (doing, since) = a.current();
            WorkerReport {
                worker: a.worker().to_string(),
                doing,
                for_seconds: seconds(now - since),
                died: a.died(),
            }
        })
        .collect();
    let conditions: Vec<ConditionReport> = registry
        .conditions
        .load()
        .iter()
        .filter_map(|c| {
            c.current().map(|(detail, since)| ConditionReport {
                condition: c.name().to_string(),
                detail,
                for_seconds: seconds(now - since),
            })
        })
        .collect();
    let mut queues = Vec::new();
    let mut stalled = Vec::new();
    for probe in registry.probes.load().iter() {
        let sample = probe.sample().unwrap_or_default();
        let sample_age_ms = probe.sampled_at().map(|at| now - at);
        let progress = probe.progress();
        let track = tracks.entry(probe.name()).or_insert(Track {
            progress,
            since_ms: now,
            stalled: false,
        });
        if progress != track.progress || sample.depth == 0 {
            track.progress = progress;
            track.since_ms = now;
        }
        let idle_ms = now - track.since_ms;
        let unanswered = sample_age_ms.is_some_and(|age| age >= stall_after_ms);
        let is_stalled = probe.watched()
            && ((sample.depth > 0 && idle_ms >= probe.stall_after_ms(stall_after_ms))
                || unanswered);
        if is_stalled && !track.stalled {
            registry
                .stalls
                .get_or_create(&vec![("queue".to_string(), probe.name().to_string())])
                .inc();
            let doing: Vec<String> = workers
                .iter()
                .map(|w| format!("{}: {} (for {:.1} s)", w.worker, w.doing, w.for_seconds))
                .collect();
            if unanswered {
                tracing::error!(
                    queue = probe.name(),
                    sample_age_seconds = sample_age_ms.map(seconds),
                    "STALL: the {} queue's depth could not be read from the database for {:.1} s (last seen: {} item(s)); workers:\n  {}",
                    probe.name(),
                    sample_age_ms.map_or(0.0, seconds),
                    sample.depth,
                    doing.join("\n  ")
                );
            } else {
                tracing::error!(
                    queue = probe.name(),
                    depth = sample.depth,
                    no_progress_seconds = seconds(idle_ms),
                    "STALL: the {} queue holds {} item(s) and has made no progress for {:.1} s; workers:\n  {}",
                    probe.name(),
                    sample.depth,
                    seconds(idle_ms),
                    doing.join("\n  ")
                );
            }
        } else if !is_stalled && track.stalled {
            tracing::warn!(
                queue = probe.name(),
                "the {} queue is moving again",
                probe.name()
            );
        }
        track.stalled = is_stalled;
        let labels = vec![("queue".to_string(), probe.name().to_string())];
        registry
            .depth
            .get_or_create(&labels)
            .set(sample.depth as i64);
        registry
            .progress
            .get_or_create(&labels)
            .set(progress as i64);
        if is_stalled {
            stalled.push(StalledQueue {
                queue: probe.name().to_string(),
                depth: sample.depth,
                no_progress_seconds: seconds(idle_ms),
            });
        }
        queues.push(QueueHealth {
            queue: probe.name().to_string(),
            depth: sample.depth,
            oldest_age_seconds: sample.oldest_ms.map(|t| seconds(now - t)),
            progress,
            no_progress_seconds: if sample.depth > 0 {
                seconds(idle_ms)
            } else {
                0.0
            },
            watched: probe.watched(),
            sample_age_seconds: sample_age_ms.map(seconds),
            stalled: is_stalled,
        });
    }
    let deadlocks = registry
        .deadlocks
        .load()
        .as_ref()
        .as_ref()
        .map_or(0, |r| r.count());
    registry.deadlock_count.set(deadlocks as i64);
    let blocked = blocked_tasks(registry, now, stall_after_ms);
    registry.health.store(Arc::new(Health {
        healthy: stalled.is_empty()
            && deadlocks == 0
            && blocked.is_empty()
            && conditions.is_empty()
            && !workers.iter().any(|w| w.died),
        stalled,
        conditions,
        queues,
        workers,
        blocked,
        deadlocks,
        checked_at_ms: now,
    }));
}

/// Sessions whose poll has run for the stall time, and runtimes whose heartbeat is that
/// old; each is logged once, naming the session's client and command.
fn blocked_tasks(registry: &Registry, now: i64, stall_after_ms: i64) -> Vec<BlockedTask> {
    // Gathered first, logged after: no lock of ours is taken while another is held.
    let mut found: Vec<(u64, BlockedTask)> = Vec::new();
    for task in registry.tasks.tasks() {
        let Some(in_poll) = task
            .in_poll_ms(now)
            .filter(|ms| *ms >= stall_after_ms.max(200))
        else {
            continue;
        };
        found.push((
            Arc::as_ptr(&task) as usize as u64,
            BlockedTask {
                what: format!("{} session", task.protocol),
                peer: Some(task.peer.clone()),
                doing: Some(task.doing().to_string()),
                seconds: seconds(in_poll),
            },
        ));
    }
    for beat in registry.tasks.heartbeats() {
        let age = beat.age_ms(now);
        if age < stall_after_ms.max(1_000) {
            continue;
        }
        found.push((
            Arc::as_ptr(&beat) as usize as u64,
            BlockedTask {
                what: format!("runtime {}", beat.name),
                peer: None,
                doing: None,
                seconds: seconds(age),
            },
        ));
    }
    let mut reported = registry.reported.lock();
    let fresh: Vec<&BlockedTask> = found
        .iter()
        .filter(|(id, _)| reported.insert(*id))
        .map(|(_, t)| t)
        .collect();
    reported.retain(|id| found.iter().any(|(f, _)| f == id));
    drop(reported);
    for task in fresh {
        registry.blocked_count.inc();
        match (&task.peer, &task.doing) {
            (Some(peer), Some(doing)) => tracing::error!(
                what = %task.what,
                %peer,
                command = %doing,
                "STALL: a {} from {} has held a runtime thread for {:.1} s in one poll (command: {}); other sessions on that thread wait",
                task.what,
                peer,
                task.seconds,
                doing
            ),
            _ => tracing::error!(
                what = %task.what,
                "STALL: the {} has run no task for {:.1} s",
                task.what,
                task.seconds
            ),
        }
    }
    found.into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_without_progress_is_stalled_until_it_moves() {
        let registry = Registry::default();
        let probe = Probe::new("conversion");
        let idle_probe = Probe::sampled("outbound", false, || {
            Some(crate::Sample {
                depth: 5,
                oldest_ms: Some(0),
            })
        });
        idle_probe.refresh();
        registry.add_probe(probe.clone());
        registry.add_probe(idle_probe);
        let worker = Activity::new("conversion-0");
        registry.add_activity(worker.clone());
        let mut tracks = HashMap::new();
        check(&registry, &mut tracks, 0);
        assert!(registry.health().healthy, "empty queues are not stalled");

        probe.enqueued(3);
        worker.set("converting Q1");
        check(&registry, &mut tracks, 1_000_000);
        assert!(
            registry.health().healthy,
            "not yet: the stall time has not passed"
        );
        check(&registry, &mut tracks, 0);
        let health = registry.health();
        assert!(!health.healthy);
        assert_eq!(
            health.stalled.len(),
            1,
            "an unwatched queue is never stalled"
        );
        assert_eq!(health.stalled[0].queue, "conversion");
        assert_eq!(health.workers[0].doing, "converting Q1");
        assert_eq!(
            registry
                .stalls
                .get_or_create(&vec![("queue".into(), "conversion".into())])
                .get(),
            1
        );

        // Progress restarts the clock: with a realistic stall time it is healthy again.
        probe.finished(1);
        check(&registry, &mut tracks, 10_000);
        assert!(registry.health().healthy, "progress clears the stall");
    }

    #[test]
    fn a_patient_queue_is_stalled_only_after_its_own_longer_time() {
        let registry = Registry::default();
        let probe = Probe::new("outbound delivery");
        probe.set_patience(Duration::from_secs(3600));
        registry.add_probe(probe.clone());
        let mut tracks = HashMap::new();
        check(&registry, &mut tracks, 0);
        probe.enqueued(1);
        check(&registry, &mut tracks, 0);
        assert!(
            registry.health().healthy,
            "within its patience, although past the watchdog's stall time"
        );
        probe.set_patience(Duration::ZERO);
        check(&registry, &mut tracks, 0);
        assert_eq!(registry.health().stalled[0].queue, "outbound delivery");
    }

    #[test]
    fn a_slow_sampler_never_delays_the_verdict_and_a_silent_one_is_a_stall() {
        use std::sync::mpsc;
        let registry = Arc::new(Registry::default());
        let (release, blocked) = mpsc::channel::<()>();
        let blocked = parking_lot::Mutex::new(blocked);
        let answers = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let probe = {
            let answers = answers.clone();
            Probe::sampled("inbound conversion", true, move || {
                // The first answer is immediate; later ones wait until released, like a
                // database read stuck behind a busy disk.
                if answers.fetch_add(1, Ordering::SeqCst) > 0 {
                    let _ = blocked.lock().recv();
                }
                Some(crate::Sample {
                    depth: 2,
                    oldest_ms: Some(crate::now_ms()),
                })
            })
        };
        registry.add_probe(probe.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            Watchdog::start(
                registry.clone(),
                Duration::from_millis(300),
                Duration::from_millis(10),
                move || stop.load(Ordering::Relaxed),
            )
            .unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Progress keeps moving, so only the silent sampler can make it unhealthy.
        let health = loop {
            probe.progressed(1);
            let health = registry.health();
            if !health.healthy || std::time::Instant::now() > deadline {
                break health;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            !health.healthy,
            "a sampler silent for the stall time is a stall"
        );
        let queue = &health.queues[0];
        assert!(queue.stalled);
        assert!(queue.sample_age_seconds.unwrap() >= 0.3);
        assert_eq!(queue.depth, 2, "the last answer is still reported");
        assert!(
            crate::now_ms() - health.checked_at_ms < 1_000,
            "the verdict kept being renewed while the sampler was blocked"
        );
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        drop(release);
    }

    #[test]
    fn a_raised_condition_is_unhealthy_and_named_until_cleared() {
        let registry = Registry::default();
        let disk = registry.condition("disk");
        assert!(Arc::ptr_eq(&disk, &registry.condition("disk")));
        let mut tracks = HashMap::new();
        check(&registry, &mut tracks, 1000);
        assert!(registry.health().healthy);
        assert!(disk.raise("data folder /x: 1 MiB free"));
        assert!(!disk.raise("data folder /x: 2 MiB free"), "already raised");
        check(&registry, &mut tracks, 1000);
        let health = registry.health();
        assert!(!health.healthy);
        assert_eq!(health.conditions.len(), 1);
        assert_eq!(health.conditions[0].condition, "disk");
        assert_eq!(health.conditions[0].detail, "data folder /x: 2 MiB free");
        assert!(disk.clear());
        check(&registry, &mut tracks, 1000);
        assert!(registry.health().healthy);
        assert!(registry.health().conditions.is_empty());
    }

    #[test]
    fn a_worker_thread_that_panics_turns_health_red_at_once() {
        let registry = Registry::default();
        let activity = Activity::new("spool-writer");
        registry.add_activity(activity.clone());
        let thread_activity = activity.clone();
        let joined = std::thread::spawn(move || {
            let _guard = thread_activity.guard();
            panic!("injected");
        })
        .join();
        assert!(joined.is_err());
        let mut tracks = HashMap::new();
        check(&registry, &mut tracks, 60_000);
        let health = registry.health();
        assert!(!health.healthy, "a dead worker is not healthy");
        let report = &health.workers[0];
        assert!(report.died);
        assert!(report.doing.contains("DIED"), "{}", report.doing);
        // A thread that ends normally (shutdown) is not a death.
        let quiet = Activity::new("conversion-0");
        let q = quiet.clone();
        std::thread::spawn(move || drop(q.guard())).join().unwrap();
        assert!(!quiet.died());
    }
}
