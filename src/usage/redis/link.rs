//! A connection to Redis that is replaced when it goes silent.
//!
//! redis-rs's `ConnectionManager` reconnects when its connection is reset or dropped, but not
//! when it stops answering: a blackholed path (a firewall or NAT that forgot the flow, a
//! failover that moved the address, a frozen host) reports nothing, so every call times out
//! and the manager keeps the dead connection until the kernel gives up on it, which takes
//! minutes with data in flight. Decisions would stay `degraded` and writes would stall that long.
//!
//! A probe sends PING over the current connection every [`PROBE_EVERY`]. When it goes
//! unanswered [`SILENT_PROBES`] times in a row, a fresh connection is opened and PINGed; only
//! if that one answers does it replace the current one. A Redis that is merely busy (a long
//! script, a fork) answers neither, and nothing is churned; a Redis that is down is refused at
//! connect time, which the manager handles itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::RedisStartError;
use super::writer::{BACKOFF_MAX, BACKOFF_MIN};

/// How often the current connection is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe waits for its PONG (behind whatever the connection already carries).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes unanswered in a row before a fresh connection is tried.
const SILENT_PROBES: u32 = 3;

/// A reconnecting multiplexed connection, replaced when it goes silent (see the module doc).
pub(super) struct Link {
    current: ArcSwap<ConnectionManager>,
    client: redis::Client,
    response_timeout: Option<Duration>,
    /// Connections replaced because they went silent.
    replaced: AtomicU64,
    /// When a call on the current connection was last answered (ms since `epoch`): a
    /// connection busy with long pipelines answers them, and a PING queued behind them is
    /// not needed to tell it is alive.
    answered_ms: AtomicU64,
    epoch: Instant,
}

impl Link {
    /// Connects lazily (a Redis that is down at start is reconnected to, not fatal) and starts
    /// the probe, which ends with the last handle. `response_timeout` None leaves the bound on
    /// each call to the caller. Must be called inside a tokio runtime.
    pub(super) fn open(
        client: redis::Client,
        response_timeout: Option<Duration>,
    ) -> Result<Arc<Self>, RedisStartError> {
        let link = Arc::new(Self {
            current: ArcSwap::from_pointee(manager(client.clone(), response_timeout)?),
            client,
            response_timeout,
            replaced: AtomicU64::new(0),
            answered_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        tokio::spawn(probe(Arc::downgrade(&link)));
        Ok(link)
    }

    /// The current connection (a cheap handle: clone it per call).
    pub(super) fn get(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.current.load())
    }

    /// A call on the connection was answered.
    pub(super) fn answered(&self) {
        self.answered_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether a call was answered within the last `within`.
    fn answered_within(&self, within: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(self.answered_ms.load(Ordering::Relaxed)) < within.as_millis() as u64
    }

    /// How many times the connection was replaced because it went silent.
    pub(super) fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Opens a fresh connection and swaps it in if it answers; `false` if it did not either.
    async fn renew(&self) -> bool {
        let Ok(mut fresh) = manager(self.client.clone(), self.response_timeout) else {
            return false;
        };
        if !answers(&mut fresh).await {
            return false;
        }
        self.current.store(Arc::new(fresh));
        self.replaced.fetch_add(1, Ordering::Relaxed);
        self.answered();
        true
    }
}

/// A reconnecting multiplexed connection.
fn manager(
    client: redis::Client,
    response_timeout: Option<Duration>,
) -> Result<ConnectionManager, RedisStartError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(response_timeout)
        .set_min_delay(BACKOFF_MIN)
        .set_max_delay(BACKOFF_MAX)
        // A few attempts per reconnection; the next call after they fail starts another, so
        // nothing waits on a reconnection that never ends.
        .set_number_of_retries(4);
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| RedisStartError(e.to_string()))
}

/// Whether `conn` answers a PING within [`PROBE_TIMEOUT`]. Any reply counts, an error reply
/// included (BUSY, LOADING, NOAUTH): the connection carries answers. A refused or dropped
/// connection does not count, but the manager reconnects it by itself.
async fn answers(conn: &mut ConnectionManager) -> bool {
    let ping = redis::cmd("PING");
    let ping = ping.query_async::<redis::Value>(conn);
    match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => error.code().is_some() || error.into_server_errors().is_some(),
        Err(_) => false,
    }
}

async fn probe(link: Weak<Link>) {
    let mut silent = 0;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(link) = link.upgrade() else {
            return;
        };
        if link.answered_within(PROBE_EVERY) || answers(&mut link.get()).await {
            link.answered();
            silent = 0;
            continue;
        }
        silent += 1;
        if silent < SILENT_PROBES {
            continue;
        }
        silent = 0;
        if link.renew().await {
            tracing::warn!(
                "usage history in Redis: the connection stopped answering while a new one did; replaced"
            );
        }
    }
}
