//! The accept loop shared by the SMTP, IMAP and POP3 listeners.
//!
//! Why one copy: each listener needs the same four things, and getting any of them wrong
//! is how a server wedges or dies under load: a connection limit (beyond it the client
//! gets the protocol's "try later" line and is closed, never queued without bound), one
//! task per connection spawned on a `TaskTracker` (so shutdown can wait for them with a
//! deadline), back-off when `accept` fails (out of file descriptors must not spin), and
//! stopping at once when the cancellation token fires. Shape after mini-redis.
//!
//! A second limit counts connections per client address, so one client (or one
//! attacker) cannot take every slot of the first: beyond it the client gets the same
//! "try later" line. The count lives in a map under a leaf lock that is never held
//! across an `.await`; the entry goes when its last connection ends.

use mailroom_watch::RankedMutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a listener accepts.
pub struct Limits {
    /// The protocol's name, for logs.
    pub protocol: &'static str,
    /// Concurrent connections, at most.
    pub connections_max: usize,
    /// Concurrent connections from one client address, at most.
    pub per_client_max: usize,
    /// What a client beyond the limit is told before the connection closes.
    pub refusal: &'static [u8],
}

/// Accepts connections until `cancel` fires and runs `handle` for each on `tracker`.
/// `refused` is called for each connection turned away at the limit (for metrics).
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    cancel: CancellationToken,
    tracker: TaskTracker,
    refused: impl Fn(),
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let clients = ClientCounts::default();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (mut stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "{} accept failed", limits.protocol);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = clients.admit(peer.ip(), limits.per_client_max.max(1));
        let (Ok(permit), Some(client)) = (permits.clone().try_acquire_owned(), client) else {
            if client_refused(&clients, peer.ip(), limits.per_client_max.max(1)) {
                tracing::debug!(%peer, limit = limits.per_client_max, "{} refused: too many connections from this client", limits.protocol);
            }
            refused();
            let refusal = limits.refusal;
            tracker.spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), stream.write_all(refusal)).await;
            });
            continue;
        };
        let connection = handle(stream, peer);
        tracker.spawn(async move {
            connection.await;
            drop(permit);
            drop(client);
        });
    }
}

/// Open connections per client address (see the module documentation).
#[derive(Clone)]
struct ClientCounts(Arc<RankedMutex<HashMap<IpAddr, usize>>>);

impl Default for ClientCounts {
    fn default() -> ClientCounts {
        ClientCounts(Arc::new(RankedMutex::new(
            mailroom_watch::rank::LISTENER_CLIENT_COUNTS,
            "listener client counts",
            HashMap::new(),
        )))
    }
}

/// One connection counted for its client; uncounted when dropped.
struct ClientSlot {
    counts: ClientCounts,
    ip: IpAddr,
}

impl ClientCounts {
    /// Counts a connection from `ip` unless it already has `max`.
    fn admit(&self, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut counts = self.0.lock();
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            counts: self.clone(),
            ip,
        })
    }

    fn count(&self, ip: IpAddr) -> usize {
        let counts = self.0.lock();
        counts.get(&ip).copied().unwrap_or(0)
    }
}

/// Whether a refusal was for the client's own limit (for the log).
fn client_refused(clients: &ClientCounts, ip: IpAddr, max: usize) -> bool {
    clients.count(ip) >= max
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The session counters every listener keeps (clones share the same values).
#[derive(Clone)]
pub struct SessionMetrics {
    /// Sessions started.
    pub sessions: prometheus_client::metrics::counter::Counter,
    /// Sessions open now.
    pub active: prometheus_client::metrics::gauge::Gauge,
    /// Where sessions are watched for polls that do not return (the watchdog reads it).
    pub tasks: Arc<mailroom_watch::Tasks>,
}

tokio::task_local! {
    static CURRENT: Arc<mailroom_watch::TaskWatch>;
}

/// Says what the current session is doing (a command name), for the watchdog's report
/// should the session block its runtime thread. Outside a session it does nothing.
pub fn doing(what: &'static str) {
    let _ = CURRENT.try_with(|watch| watch.set_doing(what));
}

/// Stamps `beat` every `interval` on the current runtime until `cancel` fires: the
/// watchdog reports the runtime when the stamp goes stale.
///
/// The stamp is a task spawned onto the runtime from a thread of its own, not a task
/// that sleeps on the runtime's timer. Why: a session that holds its worker thread in
/// one poll can leave the runtime with nobody driving its I/O and timers. Tokio lets
/// one parked worker wait on the I/O and timer driver and the others on a condition
/// variable; when the driver's worker wakes for an event and then blocks in the
/// session it woke, the others sleep on, so no connection is accepted and no timer
/// fires (the heartbeat's own included) until the poll returns. The watchdog test
/// found it: in 2 runs of 5 nothing on the runtime moved for the whole 8 s of a
/// blocked session. A task spawned from outside the runtime wakes a sleeping worker,
/// which runs it and then parks on the driver, so the other sessions go on; and if
/// every worker is blocked, the stamp goes stale, which is what the watchdog reports.
pub fn spawn_heartbeat(
    beat: Arc<mailroom_watch::Heartbeat>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let runtime = tokio::runtime::Handle::current();
    beat.beat();
    let spawned = std::thread::Builder::new()
        .name(format!("heartbeat-{}", beat.name))
        .spawn(move || {
            while !cancel.is_cancelled() {
                std::thread::sleep(interval);
                let beat = beat.clone();
                // After the runtime has shut down the task is dropped unrun.
                drop(runtime.spawn(async move { beat.beat() }));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the runtime's heartbeat thread");
    }
}

/// [`serve`] for a protocol server: each connection runs `session` with the shutdown
/// token, counted in `metrics`, and a session that ends with an error is logged at
/// debug level (a client going away mid-command is normal, not news).
pub async fn serve_sessions<H, F>(
    listener: TcpListener,
    limits: Limits,
    cancel: CancellationToken,
    tracker: TaskTracker,
    refused: impl Fn(),
    metrics: SessionMetrics,
    session: H,
) where
    H: Fn(TcpStream, SocketAddr, CancellationToken) -> F,
    F: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let protocol = limits.protocol;
    let session_cancel = cancel.clone();
    serve(
        listener,
        limits,
        cancel,
        tracker,
        refused,
        move |stream, peer| {
            let connection = session(stream, peer, session_cancel.clone());
            let metrics = metrics.clone();
            let guard = metrics.tasks.watch(protocol, peer.to_string());
            let watch = guard.watch().clone();
            guard.wrap(CURRENT.scope(watch, async move {
                metrics.sessions.inc();
                metrics.active.inc();
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "{protocol} session ended with an error");
                }
                metrics.active.dec();
            }))
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_refused_and_shutdown_stops_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let release = Arc::new(tokio::sync::Notify::new());
        let server = {
            let (cancel, tracker, release) = (cancel.clone(), tracker.clone(), release.clone());
            tokio::spawn(async move {
                serve(
                    listener,
                    Limits {
                        protocol: "test",
                        connections_max: 1,
                        per_client_max: 1,
                        refusal: b"busy\r\n",
                    },
                    cancel,
                    tracker,
                    || {},
                    move |mut stream, _| {
                        let release = release.clone();
                        async move {
                            let _ = stream.write_all(b"hello\r\n").await;
                            release.notified().await;
                        }
                    },
                )
                .await
            })
        };
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut line = [0u8; 7];
        first.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"hello\r\n");
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut refusal = Vec::new();
        second.read_to_end(&mut refusal).await.unwrap();
        assert_eq!(refusal, b"busy\r\n");
        cancel.cancel();
        server.await.unwrap();
        release.notify_waiters();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("every connection task finished");
    }
}
