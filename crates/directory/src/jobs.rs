//! Background directory jobs (address regeneration, imports) with progress.
//!
//! A job runs on its own thread and submits its work to the single writer in chunks, so
//! mail keeps flowing and other administrators' changes interleave with it. Progress is
//! a set of atomics the API reads at any time; the registry of jobs is an `arc-swap`
//! list (no lock). Only the job's own thread writes its counters and its error list.

use crate::writer::{Change, Directory};
use arc_swap::ArcSwap;
use mailroom_watch::{Activity, Probe, RankedMutex, Registry};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Jobs kept for inspection; older finished ones are forgotten.
const JOBS_KEPT: usize = 100;

/// Row errors kept per job; beyond that only the count grows.
const ERRORS_KEPT: usize = 10_000;

/// How long a regeneration job waits before it starts, so that a newer one started
/// meanwhile supersedes it before it scans the directory.
const REGENERATION_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Recipients per regeneration step (one writer request each).
const REGENERATION_CHUNK: usize = 250;

/// A job's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Still working.
    Running,
    /// Finished (some rows may have failed; see the counts).
    Done,
    /// Stopped by an error that affects the whole job.
    Failed,
    /// Stopped because a newer job does the same work over again (a template changed
    /// again while addresses were being regenerated: the newer job applies the newest
    /// template to every recipient, so finishing this one would only be wasted writes).
    Superseded,
}

/// One background job and its progress.
pub struct Job {
    /// Identity, unique in this process.
    pub id: u64,
    /// What it does (`regenerate addresses`, `import people.csv`).
    pub kind: String,
    started_at_ms: i64,
    state: AtomicU8,
    total: AtomicU64,
    scanned: AtomicU64,
    updated: AtomicU64,
    failed: AtomicU64,
    errors: ArcSwap<Vec<String>>,
    summary: ArcSwap<String>,
    /// Whether the directory writer was pacing background work for mail at the job's
    /// last step.
    paced: std::sync::atomic::AtomicBool,
    /// The jobs queue's probe: a running job is one item; rows scanned are progress.
    probe: Arc<Probe>,
    /// What the job's thread is doing, listed with the watchdog while it runs.
    activity: Arc<Activity>,
    registry: Option<Arc<Registry>>,
}

/// What the API shows of a job.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct JobReport {
    /// Identity.
    pub id: u64,
    /// What it does.
    pub kind: String,
    /// `running`, `done`, `failed` or `superseded`.
    pub state: String,
    /// When it started (Unix ms).
    pub started_at_ms: i64,
    /// Items to process, when known (0 when not).
    pub total: u64,
    /// Items looked at so far.
    pub scanned: u64,
    /// Items changed.
    pub updated: u64,
    /// Items that failed.
    pub failed: u64,
    /// The first failures, each naming its item (line, attribute, reason for imports).
    pub errors: Vec<String>,
    /// A closing line.
    pub summary: String,
    /// True while the job yields to mail: mail is moving, and the directory writer
    /// gives background work (imports, address regeneration) a small share of its
    /// time, serving administrators' single changes first.
    #[serde(default)]
    pub paced: bool,
}

impl Job {
    fn new(id: u64, kind: String, probe: Arc<Probe>, registry: Option<Arc<Registry>>) -> Job {
        let activity = Activity::new(format!("job-{id}"));
        activity.set(format!("{kind}: starting"));
        if let Some(registry) = &registry {
            registry.add_activity(activity.clone());
        }
        probe.enqueued(1);
        Job {
            id,
            activity,
            probe,
            registry,
            kind,
            started_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            state: AtomicU8::new(0),
            total: AtomicU64::new(0),
            scanned: AtomicU64::new(0),
            updated: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: ArcSwap::from_pointee(Vec::new()),
            summary: ArcSwap::from_pointee(String::new()),
            paced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The job's state now.
    pub fn state(&self) -> JobState {
        match self.state.load(Ordering::Acquire) {
            0 => JobState::Running,
            1 => JobState::Done,
            3 => JobState::Superseded,
            _ => JobState::Failed,
        }
    }

    /// Sets how many items there are.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// Counts progress.
    pub fn progress(&self, scanned: u64, updated: u64, failed: u64) {
        self.probe.progressed(scanned);
        let done = self.scanned.fetch_add(scanned, Ordering::Relaxed) + scanned;
        self.activity.set(format!(
            "{}: {done} of {} record(s)",
            self.kind,
            self.total.load(Ordering::Relaxed)
        ));
        self.updated.fetch_add(updated, Ordering::Relaxed);
        self.failed.fetch_add(failed, Ordering::Relaxed);
    }

    /// Records whether the directory is pacing background work (see
    /// [`JobReport::paced`]).
    pub fn set_paced(&self, paced: bool) {
        self.paced.store(paced, Ordering::Relaxed);
    }

    /// Records failures (only the job's thread calls this).
    pub fn record_errors(&self, errors: Vec<String>) {
        if errors.is_empty() {
            return;
        }
        let mut all = (**self.errors.load()).clone();
        let room = ERRORS_KEPT.saturating_sub(all.len());
        all.extend(errors.into_iter().take(room));
        self.errors.store(Arc::new(all));
    }

    /// Marks the job finished.
    pub fn finish(&self, ok: bool, summary: String) {
        self.end(if ok { 1 } else { 2 }, summary);
    }

    /// Marks the job stopped in favour of job `by`.
    pub fn supersede(&self, by: u64) {
        let r = self.report();
        self.end(
            3,
            format!(
                "superseded by job {by} after {} of {} (it renews every address from the newest template)",
                r.scanned, r.total
            ),
        );
    }

    fn end(&self, state: u8, summary: String) {
        self.summary.store(Arc::new(summary));
        self.state.store(state, Ordering::Release);
        self.probe.finished(1);
        if let Some(registry) = &self.registry {
            registry.remove_activity(&self.activity);
        }
    }

    /// A consistent-enough copy for the API.
    pub fn report(&self) -> JobReport {
        let state = match self.state() {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Superseded => "superseded",
        };
        JobReport {
            id: self.id,
            kind: self.kind.clone(),
            state: state.into(),
            started_at_ms: self.started_at_ms,
            total: self.total.load(Ordering::Relaxed),
            scanned: self.scanned.load(Ordering::Relaxed),
            updated: self.updated.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            errors: (**self.errors.load()).clone(),
            summary: (**self.summary.load()).clone(),
            paced: self.state() == JobState::Running && self.paced.load(Ordering::Relaxed),
        }
    }
}

/// Every job of this process, newest last.
pub struct Jobs {
    next_id: AtomicU64,
    list: ArcSwap<Vec<Arc<Job>>>,
    probe: Arc<Probe>,
    registry: Option<Arc<Registry>>,
    /// Job threads, joined once finished (never detached: glibc's `pthread_detach`
    /// races with a thread that is exiting). Rank 80, a leaf: held to push and to join
    /// threads that have already finished.
    threads: RankedMutex<Vec<std::thread::JoinHandle<()>>>,
    /// The newest regeneration job's id: older regeneration jobs stop at their next
    /// step, so however often templates change, at most one regeneration feeds the
    /// writer (the long churn run had a hundred, each rewriting 100,000 recipients,
    /// and their transactions held the store's write turn for seconds).
    pub(crate) newest_regeneration: Arc<AtomicU64>,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs::new(None)
    }
}

impl Jobs {
    /// The job list; with a watchdog registry, running jobs are listed as workers there.
    pub fn new(registry: Option<Arc<Registry>>) -> Jobs {
        Jobs {
            next_id: AtomicU64::new(0),
            list: ArcSwap::from_pointee(Vec::new()),
            probe: Probe::new("directory jobs"),
            registry,
            threads: RankedMutex::new(
                mailroom_watch::rank::DIRECTORY_JOB_THREADS,
                "directory job threads",
                Vec::new(),
            ),
            newest_regeneration: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Keeps a job's thread; joins the ones that have finished.
    fn keep(&self, handle: std::thread::JoinHandle<()>) {
        let mut threads = self.threads.lock();
        let (finished, running): (Vec<_>, Vec<_>) =
            threads.drain(..).partition(|h| h.is_finished());
        *threads = running;
        threads.push(handle);
        drop(threads);
        for handle in finished {
            let _ = handle.join();
        }
    }

    /// The jobs queue's probe (register it with the watchdog).
    pub fn probe(&self) -> Arc<Probe> {
        self.probe.clone()
    }

    /// Registers a new running job.
    pub fn create(&self, kind: impl Into<String>) -> Arc<Job> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job::new(
            id,
            kind.into(),
            self.probe.clone(),
            self.registry.clone(),
        ));
        self.list.rcu(|list| {
            let mut list: Vec<Arc<Job>> = (**list).clone();
            list.push(job.clone());
            // Forget jobs beyond the limit: superseded ones first (a newer job redid their
            // work, so they tell nothing), then the oldest finished job of whichever kind
            // has the most finished jobs, so a burst of one kind (template changes start
            // a regeneration each) never pushes out the only import. A running job is
            // never forgotten. (The long churn run lost track of its import twice: once
            // while it ran, once after it finished, behind hundreds of regenerations.)
            let mut excess = list.len().saturating_sub(JOBS_KEPT);
            while excess > 0 {
                let superseded = list.iter().position(|j| j.state() == JobState::Superseded);
                let victim = superseded.or_else(|| {
                    let mut finished: HashMap<&str, usize> = HashMap::new();
                    for j in list.iter().filter(|j| j.state() != JobState::Running) {
                        *finished.entry(kind_class(&j.kind)).or_default() += 1;
                    }
                    let busiest = finished
                        .into_iter()
                        .max_by_key(|(_, n)| *n)
                        .map(|(class, _)| class.to_string())?;
                    list.iter().position(|j| {
                        j.state() != JobState::Running && kind_class(&j.kind) == busiest
                    })
                });
                match victim {
                    Some(index) => {
                        list.remove(index);
                        excess -= 1;
                    }
                    None => break, // only running jobs left
                }
            }
            list
        });
        job
    }

    /// The job with this identity.
    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.list.load().iter().find(|j| j.id == id).cloned()
    }

    /// Every job kept.
    pub fn all(&self) -> Vec<Arc<Job>> {
        (**self.list.load()).clone()
    }
}

/// What kind of job this is, for retention: the first word (`regenerate`, `import`).
fn kind_class(kind: &str) -> &str {
    kind.split_whitespace().next().unwrap_or("")
}

/// Starts the background job that renews every generated address from the current
/// template, in chunks through the writer. A regeneration job still running stops at
/// its next step, superseded by this one.
pub fn start_regeneration(directory: Directory, jobs: &Jobs) -> Arc<Job> {
    let job = jobs.create("regenerate addresses");
    jobs.newest_regeneration.fetch_max(job.id, Ordering::AcqRel);
    let handle = job.clone();
    let newest = jobs.newest_regeneration.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("job-{}", job.id))
        .spawn(move || {
            mailroom_watch::lower_thread_priority(mailroom_watch::BACKGROUND_NICE);
            regenerate(directory, &handle, &newest)
        });
    match spawned {
        Ok(thread) => jobs.keep(thread),
        Err(e) => job.finish(false, format!("cannot start the job: {e}")),
    }
    job
}

pub(crate) fn regenerate(directory: Directory, job: &Job, newest: &AtomicU64) {
    // A burst of template changes (an administrator trying templates, a script, the
    // churn test's loop) starts a job each, and only the newest has work to do: each
    // would first scan every recipient. Settle a moment so that the older ones stop
    // before scanning (the churn profile: a scan per change, 24 a second).
    std::thread::sleep(REGENERATION_SETTLE);
    let latest = newest.load(Ordering::Acquire);
    if latest != job.id {
        job.supersede(latest);
        return;
    }
    let snapshot = directory.snapshot();
    let mut ids: Vec<i64> = snapshot
        .recipients()
        .filter(|r| r.addresses.iter().any(|a| a.primary && a.generated))
        .map(|r| r.id)
        .collect();
    ids.sort_unstable();
    job.set_total(ids.len() as u64);
    for chunk in ids.chunks(REGENERATION_CHUNK) {
        let newest = newest.load(Ordering::Acquire);
        if newest != job.id {
            job.supersede(newest);
            return;
        }
        let applied = directory
            .apply_all_background(
                vec![Change::RegenerateAddresses {
                    ids: chunk.to_vec(),
                }],
                false,
            )
            .pop()
            .unwrap_or(Err(crate::writer::DirectoryError::Stopped));
        job.set_paced(directory.background_paced());
        match applied {
            Ok(applied) => {
                job.progress(
                    chunk.len() as u64,
                    applied.changed as u64,
                    applied.failed as u64,
                );
                job.record_errors(applied.notes);
            }
            Err(e) => {
                job.finish(false, format!("stopped: {e}"));
                return;
            }
        }
    }
    if let Err(e) = directory.sync_background_blocking() {
        return job.finish(false, format!("stopped: {e}"));
    }
    let r = job.report();
    job.finish(
        true,
        format!(
            "scanned {}, updated {}, failed {}",
            r.scanned, r.updated, r.failed
        ),
    );
}

/// How an import runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct ImportOptions {
    /// The file's format.
    pub format: crate::bulk::Format,
    /// Only validate; apply nothing.
    pub dry_run: bool,
    /// Apply every row or none.
    pub atomic: bool,
}

/// Rows per writer request in a non-atomic import: big enough to batch, small enough
/// that mail and other administrators' changes interleave (the writer's `BATCH_WEIGHT_MAX`).
const IMPORT_CHUNK: usize = 250;

/// Starts an import of `file` (deleted when the job ends) as a background job.
pub fn start_import(
    directory: Directory,
    jobs: &Jobs,
    file: std::path::PathBuf,
    name: &str,
    options: ImportOptions,
) -> Arc<Job> {
    let verb = if options.dry_run {
        "validate"
    } else {
        "import"
    };
    let job = jobs.create(format!("{verb} {name}"));
    let handle = job.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("job-{}", job.id))
        .spawn(move || {
            mailroom_watch::lower_thread_priority(mailroom_watch::BACKGROUND_NICE);
            import(&directory, &handle, &file, options);
            let _ = std::fs::remove_file(&file);
        });
    match spawned {
        Ok(thread) => jobs.keep(thread),
        Err(e) => job.finish(false, format!("cannot start the job: {e}")),
    }
    job
}

/// Counts records cheaply for the progress bar (an estimate for CSV fields that hold
/// newlines).
fn count_records(file: &std::path::Path, format: crate::bulk::Format) -> u64 {
    use std::io::BufRead;
    let Ok(f) = std::fs::File::open(file) else {
        return 0;
    };
    let lines = std::io::BufReader::new(f).lines().map_while(Result::ok);
    match format {
        crate::bulk::Format::Csv => lines
            .filter(|l| !l.trim().is_empty())
            .count()
            .saturating_sub(1) as u64,
        crate::bulk::Format::Ldif => lines
            .filter(|l| l.to_ascii_lowercase().starts_with("dn:"))
            .count() as u64,
    }
}

/// Counts an import's outcome and keeps the lines that failed, so that a failed
/// record's deferred membership change is not tried (and reported) again.
struct Tally<'a> {
    job: &'a Job,
    format: crate::bulk::Format,
    failed_lines: std::collections::HashSet<u64>,
}

impl Tally<'_> {
    fn parse_error(&mut self, error: crate::bulk::RowError) {
        self.failed_lines.insert(error.line);
        self.job.progress(1, 0, 1);
        self.job.record_errors(vec![error.to_string()]);
    }

    /// Records the results of `rows`: `updated` counts applied records, `failed` counts
    /// records with any failure (a list whose members failed counts in both).
    fn results(
        &mut self,
        rows: &[crate::bulk::Row],
        results: Vec<Result<crate::Applied, crate::DirectoryError>>,
    ) {
        let (mut scanned, mut updated, mut failed) = (0u64, 0u64, 0u64);
        let mut errors = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            scanned += u64::from(!row.deferred);
            match result {
                Ok(applied) => {
                    updated += u64::from(!row.deferred);
                    errors.extend(
                        applied
                            .notes
                            .iter()
                            .map(|n| format!("line {}: note: {n}", row.line)),
                    );
                }
                // Valid, but an all-or-nothing run failed elsewhere: not this row's fault.
                Err(crate::DirectoryError::RolledBack) => {}
                Err(e) => {
                    if self.failed_lines.insert(row.line) {
                        failed += 1;
                    }
                    errors.push(crate::bulk::row_error(row, &e, self.format).to_string());
                }
            }
        }
        self.job.progress(scanned, updated, failed);
        self.job.record_errors(errors);
    }

    /// Drops deferred rows whose record already failed.
    fn keep(&self, rows: &mut Vec<crate::bulk::Row>) {
        rows.retain(|row| !(row.deferred && self.failed_lines.contains(&row.line)));
    }
}

fn import(directory: &Directory, job: &Job, file: &std::path::Path, options: ImportOptions) {
    job.set_total(count_records(file, options.format));
    let reader = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => return job.finish(false, format!("cannot read the upload: {e}")),
    };
    let mut tally = Tally {
        job,
        format: options.format,
        failed_lines: Default::default(),
    };
    let rows = crate::bulk::parse(options.format, reader);
    if !(options.atomic || options.dry_run) {
        let mut chunk = Vec::with_capacity(IMPORT_CHUNK);
        for row in rows {
            match row {
                Ok(row) => chunk.push(row),
                Err(e) => tally.parse_error(e),
            }
            if chunk.len() >= IMPORT_CHUNK {
                apply_chunk(directory, &mut tally, &mut chunk);
            }
        }
        apply_chunk(directory, &mut tally, &mut chunk);
        // Its chunks were committed without an fsync each: "finished" only once they
        // are durable.
        if let Err(e) = directory.sync_background_blocking() {
            return job.finish(false, format!("applied, but not made durable: {e}"));
        }
        let r = job.report();
        return job.finish(
            true,
            format!(
                "scanned {}, applied {}, failed {}",
                r.scanned, r.updated, r.failed
            ),
        );
    }
    // All-or-nothing and dry runs read every row first.
    let mut all = Vec::new();
    let mut parse_failures = 0;
    for row in rows {
        match row {
            Ok(row) => all.push(row),
            Err(e) => {
                parse_failures += 1;
                tally.parse_error(e);
            }
        }
    }
    let changes: Vec<Change> = all.iter().map(|r| r.change.clone()).collect();
    if options.dry_run {
        let results = crate::writer::dry_run(&directory.snapshot(), &changes, options.atomic);
        tally.results(&all, results);
        let r = job.report();
        return job.finish(
            true,
            format!(
                "dry run: {} record(s) would apply, {} fail; nothing was changed",
                r.updated, r.failed
            ),
        );
    }
    if parse_failures > 0 {
        return job.finish(
            false,
            format!("nothing applied: {parse_failures} record(s) do not parse and the import is all-or-nothing"),
        );
    }
    let results = directory.apply_all_background(changes, true);
    let rolled_back = results.iter().any(Result::is_err);
    tally.results(&all, results);
    if !rolled_back && let Err(e) = directory.sync_background_blocking() {
        return job.finish(false, format!("applied, but not made durable: {e}"));
    }
    let r = job.report();
    if rolled_back {
        job.finish(
            false,
            format!(
                "nothing applied: {} record(s) failed and the import is all-or-nothing",
                r.failed
            ),
        );
    } else {
        job.finish(
            true,
            format!("scanned {}, applied {}, failed 0", r.scanned, r.updated),
        );
    }
}

fn apply_chunk(directory: &Directory, tally: &mut Tally<'_>, chunk: &mut Vec<crate::bulk::Row>) {
    tally.keep(chunk);
    if chunk.is_empty() {
        return;
    }
    let changes: Vec<Change> = chunk.iter().map(|r| r.change.clone()).collect();
    let results = directory.apply_all_background(changes, false);
    tally.job.set_paced(directory.background_paced());
    tally.results(chunk, results);
    chunk.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_job_is_never_forgotten_and_finished_ones_go_oldest_first() {
        let jobs = Jobs::new(None);
        let import = jobs.create("import");
        let first_finished = jobs.create("regeneration");
        first_finished.finish(true, "done".into());
        for _ in 0..JOBS_KEPT + 20 {
            jobs.create("regeneration").finish(true, "done".into());
        }
        assert!(
            jobs.get(import.id).is_some(),
            "the running import is still known"
        );
        assert!(
            jobs.get(first_finished.id).is_none(),
            "old finished jobs go"
        );
        import.finish(true, "done".into());
        for _ in 0..JOBS_KEPT {
            jobs.create("import more.csv").finish(true, "done".into());
        }
        assert!(
            jobs.get(import.id).is_none(),
            "once finished it can go too, oldest first among its kind"
        );
    }

    #[test]
    fn superseded_jobs_are_forgotten_before_a_finished_import() {
        let jobs = Jobs::new(None);
        let import = jobs.create("import");
        import.finish(true, "done".into());
        for _ in 0..JOBS_KEPT * 3 {
            let job = jobs.create("regenerate addresses");
            job.supersede(job.id + 1);
        }
        assert!(
            jobs.get(import.id).is_some(),
            "a finished import outlives any number of superseded regenerations"
        );
        assert!(jobs.all().len() <= JOBS_KEPT + 1);
    }

    #[test]
    fn a_burst_of_finished_regenerations_never_pushes_out_a_finished_import() {
        let jobs = Jobs::new(None);
        let import = jobs.create("import churn.csv");
        import.finish(true, "done".into());
        for _ in 0..JOBS_KEPT * 3 {
            jobs.create("regenerate addresses")
                .finish(true, "done".into());
        }
        assert!(
            jobs.get(import.id).is_some(),
            "the import's result is still there"
        );
        assert_eq!(jobs.all().len(), JOBS_KEPT);
    }
}
