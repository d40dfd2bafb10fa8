//! The connections of the gRPC port and of the HTTP ports (forward-auth, console, ops),
//! bounded so that nobody can take the service down without sending a byte.
//!
//! A connection is *pending* from its accept until its peer has sent the opening of its
//! protocol whole ([`Opening`]: the HTTP/2 preface, a TLS ClientHello record, or on an HTTP
//! port the first request's head); only then is it handed to the server, which is where a
//! connection starts to cost buffers and a task of its own. The bytes read meanwhile are given
//! to the server first ([`Connection`]'s reads). So:
//! - a pending connection that has not sent its opening within `handshake_timeout` is closed
//!   (a byte at a time does not keep it: the time counts from the accept);
//! - at most `max_pending` are pending: the oldest is closed to make room for a new one, so a
//!   flood of silent connections can never lock a real client (a health check) out;
//! - at most `max_connections` are served; one more is closed at once;
//! - accept errors (out of file descriptors) back off instead of spinning on the listener.
//!
//! Every connection closed for a limit is counted by reason ([`ConnectionStats`]) and logged,
//! at most once a second. Connections that stop answering once served are the HTTP/2
//! keepalive's business (`[limits] keepalive_*`, set on the server). A served connection is
//! watched ([`Watch`], checked whenever its reads or writes wait): closed once it has had
//! nothing to do for `idle_timeout` ([`Activity`]: on the gRPC port no call in flight, counted
//! by [`ActivityLayer`] up to the end of a response's body, whatever pings pass; on the HTTP
//! ports nothing written); on the HTTP ports each request head after an answer has the
//! handshake timeout to end; under TLS so has the client's side of the handshake.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::AbortHandle;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How many connections a port takes, and how long a silent or idle one may stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_pending: usize,
    pub handshake_timeout: Duration,
    /// A served connection with nothing to do this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// Milliseconds since the first call in this process: cheap to store in an atomic.
fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What a served connection is doing, for its idle timeout.
#[derive(Debug)]
pub struct Activity {
    /// Calls whose response has not ended yet (the gRPC port).
    in_flight: AtomicU64,
    /// When the connection last did something ([`now_ms`]).
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            last_ms: AtomicU64::new(now_ms()),
        }
    }

    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A call begins; it ends when the guard is dropped.
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How long the connection has had nothing to do: `None` while a call is in flight.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }
}

/// A call in flight on a connection.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        // The time first: a connection seen with no call in flight has its last call's end.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a served connection was closed by its [`Watch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lapse {
    /// Its TLS handshake, or an HTTP request head, was not sent whole within the handshake
    /// timeout.
    Handshake,
    /// Nothing to do for the idle timeout.
    Idle,
}

/// Where an HTTP/1 connection is between requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// Answered: the next request may come (the idle timeout runs from the last write).
    Awaited,
    /// A request head is arriving, since `since`, and has until the handshake timeout to end
    /// (`started`: something other than an empty line came; `window`: the last bytes read, for
    /// a blank line split between reads).
    Reading {
        since: Instant,
        started: bool,
        window: [u8; 4],
    },
    /// Its head read whole, a request is being answered since `since`: bounded by the idle
    /// timeout (a body that never comes, an answer that never goes).
    Answering { since: Instant },
}

impl Head {
    /// Reads on through `bytes`; `Answering` once a head has ended.
    fn read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || matches!(self, Head::Answering { .. }) {
            return;
        }
        if *self == Head::Awaited {
            *self = Head::Reading {
                since: Instant::now(),
                started: false,
                window: [0; 4],
            };
        }
        let Head::Reading {
            started, window, ..
        } = self
        else {
            return;
        };
        for &b in bytes {
            if !*started {
                if matches!(b, b'\r' | b'\n') {
                    continue;
                }
                *started = true;
            }
            window.rotate_left(1);
            window[3] = b;
            if window == b"\r\n\r\n" || window[2..] == *b"\n\n" {
                *self = Head::Answering {
                    since: Instant::now(),
                };
                return;
            }
        }
    }
}

/// What a served connection may not outlast, checked whenever its reads or writes wait (a
/// client that stops reading is caught too), with one timer moved on lazily.
struct Watch {
    timer: Pin<Box<tokio::time::Sleep>>,
    activity: Arc<Activity>,
    idle: Option<Duration>,
    /// The handshake timeout: for a TLS handshake and for each HTTP/1 request head.
    limit: Duration,
    served: Instant,
    /// The gRPC port under TLS, until the client has sent its first application-data record
    /// (its side of the handshake is over): what is left of the record being read.
    tls: Option<TlsRecords>,
    /// HTTP/1 on an HTTP port; `None` for h2c and the gRPC port.
    head: Option<Head>,
    /// The HTTP ports: what the server writes is the activity (the gRPC port counts calls).
    writes_count: bool,
    /// A state changed that may bring a deadline nearer: look again before trusting the timer.
    moved: bool,
    /// What the timer is set for.
    deadline: Instant,
}

/// TLS record headers in the client's bytes, to see its first application-data record.
#[derive(Debug, Default)]
struct TlsRecords {
    header: [u8; 5],
    have: usize,
    /// Payload bytes of the current record still to skip.
    skip: usize,
}

impl TlsRecords {
    /// Reads on; `true` once an application-data record (type 23) has begun.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                if self.header[0] == 23 {
                    return true;
                }
                self.skip = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.have = 0;
            }
        }
        false
    }
}

impl Watch {
    fn new(
        limits: ConnectionLimits,
        opening: Opening,
        first: &[u8],
        activity: Arc<Activity>,
    ) -> Option<Self> {
        let tls = first.first() == Some(&0x16);
        let h2 = first.starts_with(PREFACE);
        let head = (opening == Opening::Http && !h2 && !tls).then_some(Head::Answering {
            since: Instant::now(),
        });
        let tls = (opening == Opening::Http2 && tls).then(TlsRecords::default);
        if limits.idle_timeout.is_none() && head.is_none() && tls.is_none() {
            return None;
        }
        let served = Instant::now();
        Some(Self {
            timer: Box::pin(tokio::time::sleep_until(
                (served + limits.handshake_timeout).into(),
            )),
            activity,
            idle: limits.idle_timeout,
            limit: limits.handshake_timeout,
            served,
            tls,
            head,
            writes_count: opening == Opening::Http,
            moved: true,
            deadline: served,
        })
    }

    fn read(&mut self, bytes: &[u8]) {
        if let Some(tls) = &mut self.tls
            && tls.feed(bytes)
        {
            self.tls = None;
            self.moved = true;
        }
        if let Some(head) = &mut self.head {
            let before = std::mem::discriminant(head);
            head.read(bytes);
            self.moved |= before != std::mem::discriminant(head);
        }
    }

    fn wrote(&mut self) {
        if self.writes_count {
            self.activity.touch();
        }
        if let Some(head) = &mut self.head
            && *head != Head::Awaited
        {
            *head = Head::Awaited;
            self.moved = true;
        }
    }

    /// The nearest deadline, or the lapse when one has passed.
    fn due(&self) -> Result<Instant, Lapse> {
        let now = Instant::now();
        let mut next = now + self.limit;
        let mut at = |deadline: Instant, lapse| {
            if deadline <= now {
                return Err(lapse);
            }
            next = next.min(deadline);
            Ok(())
        };
        if self.tls.is_some() {
            at(self.served + self.limit, Lapse::Handshake)?;
        }
        match (self.head, self.idle) {
            (Some(Head::Reading { since, .. }), _) => at(since + self.limit, Lapse::Handshake)?,
            (Some(Head::Answering { since }), Some(after)) => at(since + after, Lapse::Idle)?,
            (Some(Head::Answering { .. }), None) => {}
            (Some(Head::Awaited) | None, Some(after)) => match self.activity.idle_for() {
                Some(idle) => at(now + after.saturating_sub(idle), Lapse::Idle)?,
                // A call in flight: look again an idle timeout from now (calls end unseen).
                None => at(now + after, Lapse::Idle)?,
            },
            (_, None) => {}
        }
        Ok(next)
    }

    /// Whether a deadline has passed; if not, the timer is set for the nearest one. The timer
    /// is polled only when it is set, which registers the connection task's waker (its only
    /// poller) until it fires; otherwise a clock read tells. Polling it on every wait also
    /// spends the task's cooperative budget: with it, the health check was slower than without
    /// any watch in 5 of 6 alternating runs (median 32.6 against 29.3 µs a call, a noisy hour);
    /// without it, in 2 of 4, inside the noise.
    fn lapsed(&mut self, cx: &mut Context<'_>) -> Option<Lapse> {
        use std::future::Future;
        if !std::mem::take(&mut self.moved) && Instant::now() < self.deadline {
            return None;
        }
        loop {
            match self.due() {
                Err(lapse) => return Some(lapse),
                Ok(next) => {
                    self.deadline = next;
                    self.timer.as_mut().reset(next.into());
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return None;
                    }
                }
            }
        }
    }
}

/// What a connection must have sent, whole, before it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The gRPC port: the HTTP/2 client preface (24 bytes), or a TLS record (the ClientHello).
    Http2,
    /// An HTTP port (forward-auth, the console): the first request's head, up to its blank
    /// line, or the HTTP/2 preface (h2c), or a TLS record.
    Http,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// At most this much is read before a connection is served: a longer request head is the
/// server's to refuse (431), and a TLS record is at most 5 + 16,384 + 2,048 bytes.
const MAX_OPENING: usize = 5 + 16_384 + 2_048;

impl Opening {
    /// Whether `read` can only be something the port does not speak: on the gRPC port, bytes
    /// that are neither the HTTP/2 preface nor a TLS record (an HTTP/1 probe, say). Closed at
    /// once rather than held until the handshake timeout, or handed to HTTP/2, which would
    /// wait for the rest of a preface that never comes.
    fn refused(self, read: &[u8]) -> bool {
        self == Opening::Http2
            && read.first().is_some_and(|b| *b != 0x16)
            && !PREFACE.starts_with(&read[..read.len().min(PREFACE.len())])
    }

    /// Whether `read` holds the whole opening (or as much as is read before serving).
    fn complete(self, read: &[u8]) -> bool {
        if read.len() >= MAX_OPENING {
            return true;
        }
        match read.first() {
            None => false,
            // A TLS handshake record: its header, then as many bytes as it says.
            Some(0x16) => {
                read.len() >= 5
                    && read.len() >= 5 + usize::from(u16::from_be_bytes([read[3], read[4]]))
            }
            Some(_) if PREFACE.starts_with(&read[..read.len().min(PREFACE.len())]) => {
                read.len() >= PREFACE.len()
            }
            Some(_) if self == Opening::Http2 => read.len() >= PREFACE.len(),
            // A request head: something, then its blank line (empty lines before it are
            // skipped, as servers do, so they do not make an opening). Read as the watch reads
            // each later head.
            Some(_) => {
                let mut head = Head::Awaited;
                head.read(read);
                matches!(head, Head::Answering { .. })
            }
        }
    }
}

/// Counters for the metrics port and tests.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// The port's name in logs and metrics ("gRPC", "forward-auth", "console").
    pub port: &'static str,
    /// Connections being served now.
    pub open: AtomicU64,
    /// Connections accepted that have not sent their opening whole yet.
    pub pending: AtomicU64,
    /// Closed because `max_connections` were being served.
    pub shed_full: AtomicU64,
    /// Closed for not sending their opening within the handshake timeout.
    pub shed_silent: AtomicU64,
    /// Closed while still silent to make room for a newer connection (`max_pending`).
    pub shed_evicted: AtomicU64,
    /// Accepts that failed (out of file descriptors, mostly).
    pub accept_errors: AtomicU64,
    /// Closed after `idle_timeout` with nothing to do (not logged: it is routine).
    pub closed_idle: AtomicU64,
    /// When the last shedding line was logged.
    last_log: std::sync::Mutex<Option<Instant>>,
}

impl ConnectionStats {
    pub fn for_port(port: &'static str) -> Self {
        Self {
            port,
            ..Self::default()
        }
    }

    fn shed(&self, counter: &AtomicU64, why: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        // try_lock: a shedding connection that finds another logging skips the line.
        let Ok(mut last) = self.last_log.try_lock() else {
            return;
        };
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::warn!(
                why,
                open = self.open.load(Ordering::Relaxed),
                pending = self.pending.load(Ordering::Relaxed),
                shed_full = self.shed_full.load(Ordering::Relaxed),
                shed_silent = self.shed_silent.load(Ordering::Relaxed),
                shed_evicted = self.shed_evicted.load(Ordering::Relaxed),
                "shedding connections on the {} port (logged at most once a second)",
                self.port
            );
        }
    }
}

/// A served connection: the socket, and its place among `max_connections`.
pub struct Connection {
    stream: TcpStream,
    /// What was read while the connection was pending, given to the server's first reads.
    opening: Vec<u8>,
    given: usize,
    activity: Arc<Activity>,
    watch: Option<Watch>,
    _slot: OwnedSemaphorePermit,
    stats: Arc<ConnectionStats>,
}

/// A served connection's address and activity, in every request's extensions (under TLS,
/// inside tonic's `TlsConnectInfo`). tonic's `Request::remote_addr` and `peer_certs` look for
/// its own types and so find nothing: read them through this type ([`peer_certs`]).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    activity: Arc<Activity>,
}

type PeerCerts = Arc<Vec<tonic::transport::CertificateDer<'static>>>;

/// The client's certificate chain on a TLS connection that presented one.
pub fn peer_certs(extensions: &http::Extensions) -> Option<PeerCerts> {
    extensions
        .get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>()?
        .peer_certs()
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.given < this.opening.len() {
            let n = buf.remaining().min(this.opening.len() - this.given);
            let given = &this.opening[this.given..this.given + n];
            buf.put_slice(given);
            if let Some(watch) = &mut this.watch {
                watch.read(given);
            }
            this.given += n;
            if this.given == this.opening.len() {
                this.opening = Vec::new();
                this.given = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending if this.lapsed(cx) => {
                // End of stream, so the server closes the connection.
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => {
                if let Some(watch) = &mut this.watch {
                    watch.read(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    /// Not vectored, on measurement: over a vectored socket h2 chains every DATA payload of 256
    /// bytes or more instead of copying it into its write buffer, and then must flush before
    /// it can take the next frame, so each such response costs a `writev` of its own (two per
    /// Classify answer, measured with `perf stat -e syscalls:*` under the mix bench's (b)).
    /// Without, payloads under 1 KiB are copied (a few hundred bytes) and frames go out
    /// together: one `send` per call, (b) 33k -> 41k calls/s on one core, the health check
    /// unchanged. Larger payloads still go as their own write. Plaintext only: under TLS,
    /// rustls's stream stands between h2 and this one and says it is vectored.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending if this.lapsed(cx) => Poll::Ready(Err(lapsed())),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connection {
    /// A write's outcome, seen by the watch: bytes written are activity; a write that waits
    /// past a deadline fails.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Pending if self.lapsed(cx) => Poll::Ready(Err(lapsed())),
            Poll::Ready(Ok(n)) => {
                if let Some(watch) = &mut self.watch
                    && n > 0
                {
                    watch.wrote();
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    /// Whether the connection's watch has found a deadline passed (counted, once).
    fn lapsed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(lapse) = self.watch.as_mut().and_then(|watch| watch.lapsed(cx)) else {
            return false;
        };
        self.watch = None;
        let counter = match lapse {
            Lapse::Handshake => &self.stats.shed_silent,
            Lapse::Idle => &self.stats.closed_idle,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }
}

fn lapsed() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection closed: handshake, request head or idle timeout",
    )
}

/// Decrements a gauge when dropped: a pending connection's task may end any way (spoke, timed
/// out, evicted by abort).
struct Pending(Arc<ConnectionStats>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connections of `listener` the server may take, under `limits`. Accepting stops when the
/// server drops the stream.
pub fn incoming(
    listener: TcpListener,
    (limits, opening): (ConnectionLimits, Opening),
    stats: Arc<ConnectionStats>,
) -> impl tokio_stream::Stream<Item = io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, (limits, opening), stats, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// [`incoming`] as an axum listener (the forward-auth, console and ops ports): the same limits,
/// an HTTP opening, counted in `stats`; the stream's errors are counted where they happen, so
/// they are skipped here.
pub fn listener(
    listener: TcpListener,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
) -> Limited {
    Limited(Box::pin(incoming(listener, (limits, Opening::Http), stats)))
}

/// The accept loop's connections as an axum listener.
pub struct Limited(Pin<Box<dyn tokio_stream::Stream<Item = io::Result<Connection>> + Send>>);

/// The peer's address is the accepted connection's (none if the socket no longer knows it).
impl axum::serve::Listener for Limited {
    type Io = Connection;
    type Addr = Option<std::net::SocketAddr>;

    async fn accept(&mut self) -> (Connection, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.0.next().await {
                Some(Ok(connection)) => {
                    let peer = connection.stream.peer_addr().ok();
                    return (connection, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop ended (shutdown): nothing more will come.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(None)
    }
}

async fn accept_loop(
    listener: TcpListener,
    (limits, opening): (ConnectionLimits, Opening),
    stats: Arc<ConnectionStats>,
    tx: mpsc::Sender<io::Result<Connection>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let max_pending = limits.max_pending.max(1);
    // Oldest first; finished tasks are skipped when evicting and pruned now and then.
    let mut pending: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                stats.shed(&stats.accept_errors, "accept failed");
                tracing::debug!(%error, "accept failed");
                // Out of descriptors (or similar): give closing connections time instead of
                // spinning on a listener that stays readable.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        if pending.len() > 2 * max_pending {
            pending.retain(|task| !task.is_finished());
        }
        while stats.pending.load(Ordering::Relaxed) as usize >= max_pending {
            let Some(oldest) = pending.pop_front() else {
                break;
            };
            if !oldest.is_finished() {
                oldest.abort();
                stats.shed(&stats.shed_evicted, "too many silent connections");
                // The aborted task's guard lowers the gauge when it is dropped; count it here so
                // the loop does not evict twice for one slot.
                break;
            }
        }
        stats.pending.fetch_add(1, Ordering::Relaxed);
        let guard = Pending(stats.clone());
        let (slots, stats, tx) = (slots.clone(), stats.clone(), tx.clone());
        let task = tokio::spawn(async move {
            let mut stream = stream;
            let mut read = Vec::new();
            let spoke = tokio::time::timeout(
                limits.handshake_timeout,
                read_opening(&mut stream, opening, &mut read),
            );
            match spoke.await {
                Ok(Ok(true)) => {}
                Ok(_) => return, // closed by the peer, or failed
                Err(_) => {
                    drop(guard);
                    stats.shed(
                        &stats.shed_silent,
                        "opening not sent within the handshake timeout",
                    );
                    return;
                }
            }
            drop(guard);
            let Ok(slot) = slots.try_acquire_owned() else {
                stats.shed(&stats.shed_full, "max_connections reached");
                return;
            };
            stats.open.fetch_add(1, Ordering::Relaxed);
            let activity = Arc::new(Activity::new());
            let watch = Watch::new(limits, opening, &read, activity.clone());
            let connection = Connection {
                stream,
                opening: read,
                given: 0,
                activity,
                watch,
                _slot: slot,
                stats,
            };
            let _ = tx.send(Ok(connection)).await;
        });
        pending.push_back(task.abort_handle());
    }
}

/// Counts the calls in flight on each connection of the gRPC port, up to the end of each
/// response's body, for the idle timeout.
#[derive(Clone, Copy, Debug)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Tracked<S>(S);

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Under TLS tonic inserts the connection's own info beside its `TlsConnectInfo`.
        let info = request.extensions().get::<ConnectionInfo>();
        let busy = info.map(|info| info.activity.begin());
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match busy {
                Some(busy) => {
                    response.map(|body| tonic::body::Body::new(Guarded { body, _busy: busy }))
                }
                None => response,
            })
        })
    }
}

/// A response body that holds its call in flight until it is dropped.
struct Guarded {
    body: tonic::body::Body,
    _busy: Busy,
}

impl http_body::Body for Guarded {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Reads into `read` until it holds `opening` whole: `false` when the peer closed first, or
/// sent what the port does not speak.
async fn read_opening(
    stream: &mut TcpStream,
    opening: Opening,
    read: &mut Vec<u8>,
) -> io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 2_048];
    while !opening.complete(read) {
        let room = chunk.len().min(MAX_OPENING - read.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(false);
        }
        read.extend_from_slice(&chunk[..n]);
        if opening.refused(read) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    async fn listen(
        limits: ConnectionLimits,
    ) -> (
        std::net::SocketAddr,
        Arc<ConnectionStats>,
        impl tokio_stream::Stream<Item = io::Result<Connection>>,
    ) {
        listen_for(limits, Opening::Http2).await
    }

    /// Four served, eight pending.
    fn four_of_eight(
        handshake_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 4,
            max_pending: 8,
            handshake_timeout,
            idle_timeout,
        }
    }

    #[tokio::test]
    async fn silent_connections_are_evicted_and_time_out_and_a_talker_gets_through() {
        let limits = four_of_eight(Duration::from_millis(300), None);
        let (addr, stats, incoming) = listen(limits).await;
        tokio::pin!(incoming);
        let mut silent = Vec::new();
        for _ in 0..40 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut talker = TcpStream::connect(addr).await.unwrap();
        talker
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let served = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("the talker is served despite 40 silent connections")
            .unwrap()
            .unwrap();
        assert_eq!(stats.open.load(Ordering::Relaxed), 1);
        assert!(stats.pending.load(Ordering::Relaxed) <= 8);
        assert!(stats.shed_evicted.load(Ordering::Relaxed) >= 32);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            stats.pending.load(Ordering::Relaxed),
            0,
            "the rest timed out"
        );
        assert!(stats.shed_silent.load(Ordering::Relaxed) >= 1);
        drop(served);
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_opening_is_whole_when_its_protocol_says() {
        use Opening::{Http, Http2};
        assert!(!Http2.complete(b""));
        assert!(!Http2.complete(&PREFACE[..23]));
        assert!(Http2.complete(PREFACE));
        assert!(!Http2.complete(b"P"), "one byte is not an opening");
        assert!(!Http2.refused(b"PRI * HT") && !Http2.refused(&[0x16]));
        assert!(
            Http2.refused(b"GET / HTTP/1.0"),
            "an HTTP/1 probe on the gRPC port"
        );
        assert!(!Http.refused(b"GET / HTTP/1.0"));
        assert!(
            !Http.complete(b"\r\n\r\n"),
            "empty lines are not a request head"
        );
        assert!(Http.complete(b"\r\nGET / HTTP/1.0\n\n"));
        let head = b"GET /check HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(!Http.complete(&head[..head.len() - 2]));
        assert!(Http.complete(head));
        assert!(!Http.complete(&PREFACE[..20]), "h2c on an HTTP port");
        assert!(Http.complete(PREFACE));
        // A TLS record of 512 bytes: its header and all of it.
        let mut record = vec![0x16, 3, 1, 2, 0];
        assert!(!Http2.complete(&record));
        record.resize(5 + 512, 0);
        assert!(!Http2.complete(&record[..record.len() - 1]));
        assert!(Http2.complete(&record) && Http.complete(&record));
        assert!(
            Http.complete(&vec![b'a'; MAX_OPENING]),
            "the server refuses what is too long"
        );
    }

    #[tokio::test]
    async fn an_opening_sent_a_byte_at_a_time_does_not_outlast_the_handshake_timeout() {
        let limits = four_of_eight(Duration::from_millis(400), None);
        let (addr, stats, incoming) = listen(limits).await;
        tokio::pin!(incoming);
        let mut trickler = TcpStream::connect(addr).await.unwrap();
        // 20 bytes 50 ms apart: about a second, past the timeout, never 50 ms silent.
        let mut closed = false;
        for byte in PREFACE.iter().take(20) {
            if trickler.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            closed || {
                use tokio::io::AsyncReadExt;
                let mut byte = [0u8; 1];
                matches!(trickler.read(&mut byte).await, Ok(0) | Err(_))
            },
            "the trickling connection is closed"
        );
        assert_eq!(stats.shed_silent.load(Ordering::Relaxed), 1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), incoming.next())
                .await
                .is_err(),
            "nothing was served"
        );
    }

    #[tokio::test]
    async fn the_server_reads_the_opening_and_what_follows_as_sent() {
        use tokio::io::AsyncReadExt;
        let limits = four_of_eight(Duration::from_secs(5), None);
        let (addr, _stats, incoming) = listen(limits).await;
        tokio::pin!(incoming);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&PREFACE[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut sent = PREFACE[10..].to_vec();
        sent.extend_from_slice(b"and the frames after it");
        client.write_all(&sent).await.unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        let expected = [PREFACE, b"and the frames after it"].concat();
        let mut got = vec![0u8; expected.len()];
        served.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        client.write_all(b"!").await.unwrap();
        let mut more = [0u8; 1];
        served.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"!");
    }

    #[tokio::test]
    async fn a_served_connection_is_closed_once_idle_and_not_while_a_call_is_in_flight() {
        use tokio::io::AsyncReadExt;
        let limits = four_of_eight(Duration::from_secs(5), Some(Duration::from_millis(300)));
        let (addr, stats, incoming) = listen(limits).await;
        tokio::pin!(incoming);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        let mut preface = [0u8; 24];
        served.read_exact(&mut preface).await.unwrap();
        // A call in flight for a second: the connection stays.
        let busy = served.connect_info().activity.begin();
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_secs(1), served.read(&mut byte)).await;
        assert!(waited.is_err(), "open while a call is in flight");
        drop(busy);
        // Then idle: closed (end of stream) about 300 ms after the call ended.
        let n = tokio::time::timeout(Duration::from_secs(5), served.read(&mut byte))
            .await
            .expect("closed once idle")
            .unwrap();
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(1_250));
        assert_eq!(stats.closed_idle.load(Ordering::Relaxed), 1);
    }

    /// `listen` with an opening of one's choice.
    async fn listen_for(
        limits: ConnectionLimits,
        opening: Opening,
    ) -> (
        std::net::SocketAddr,
        Arc<ConnectionStats>,
        impl tokio_stream::Stream<Item = io::Result<Connection>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ConnectionStats::default());
        (
            addr,
            stats.clone(),
            incoming(listener, (limits, opening), stats),
        )
    }

    /// An HTTP client that stops reading holds its connection no longer than the idle timeout:
    /// the server's writes wait, and the watch is looked at there too.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_closed_after_the_idle_timeout() {
        use tokio::io::AsyncReadExt;
        let limits = four_of_eight(Duration::from_secs(5), Some(Duration::from_millis(300)));
        let (addr, stats, incoming) = listen_for(limits, Opening::Http).await;
        tokio::pin!(incoming);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4_096).unwrap();
        let mut client = socket.connect(addr).await.unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        let mut head = [0u8; 25];
        served.read_exact(&mut head).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let written = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Err(error) = served.write_all(&chunk).await {
                    return error;
                }
            }
        })
        .await
        .expect("the writes stop once the client has not read for the idle timeout");
        assert_eq!(written.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stats.closed_idle.load(Ordering::Relaxed), 1);
        drop(client);
    }

    /// After an answer, the next request head has the handshake timeout to arrive whole: a
    /// byte at a time does not keep the connection (each byte read used to count as activity).
    #[tokio::test]
    async fn a_request_head_sent_a_byte_at_a_time_after_an_answer_is_cut() {
        use tokio::io::AsyncReadExt;
        let limits = four_of_eight(Duration::from_millis(400), Some(Duration::from_secs(60)));
        let (addr, stats, incoming) = listen_for(limits, Opening::Http).await;
        tokio::pin!(incoming);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        let mut head = [0u8; 18];
        served.read_exact(&mut head).await.unwrap();
        served
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let trickle = tokio::spawn(async move {
            for byte in b"GET /next HTTP/1.1\r\nX-A: aaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), served.read_to_end(&mut rest))
            .await
            .expect("the trickled head is cut");
        assert!(read.is_ok() && rest.len() < 40, "{read:?} {}", rest.len());
        assert_eq!(stats.shed_silent.load(Ordering::Relaxed), 1);
        trickle.abort();
    }

    /// Under TLS the client's side of the handshake must be over within the handshake timeout
    /// (its first application-data record): a ClientHello alone does not hold a served slot.
    #[tokio::test]
    async fn a_tls_hello_alone_does_not_hold_a_slot_and_a_finished_handshake_stays() {
        use tokio::io::AsyncReadExt;
        let limits = four_of_eight(Duration::from_millis(400), None);
        let (addr, stats, incoming) = listen(limits).await;
        tokio::pin!(incoming);
        let hello = |n: u16| {
            let mut record = vec![0x16, 3, 1];
            record.extend_from_slice(&n.to_be_bytes());
            record.resize(5 + usize::from(n), 1);
            record
        };
        let mut silent = TcpStream::connect(addr).await.unwrap();
        silent.write_all(&hello(200)).await.unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), served.read_to_end(&mut all))
            .await
            .expect("closed at the handshake timeout")
            .unwrap();
        assert_eq!(all.len(), 205);
        assert_eq!(stats.shed_silent.load(Ordering::Relaxed), 1);
        // A hello, a change-cipher-spec record, then application data: the handshake is over.
        let mut done = TcpStream::connect(addr).await.unwrap();
        let mut sent = hello(100);
        sent.extend_from_slice(&[0x14, 3, 3, 0, 1, 1, 0x17, 3, 3, 0, 2, 9, 9]);
        done.write_all(&sent).await.unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        let mut got = vec![0u8; sent.len()];
        served.read_exact(&mut got).await.unwrap();
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(900), served.read(&mut byte)).await;
        assert!(
            waited.is_err(),
            "still open past the handshake timeout: {waited:?}"
        );
        assert_eq!(stats.shed_silent.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn past_max_connections_a_new_one_is_closed() {
        let limits = ConnectionLimits {
            max_connections: 2,
            max_pending: 8,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: None,
        };
        let (addr, stats, incoming) = listen(limits).await;
        tokio::pin!(incoming);
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(PREFACE).await.unwrap();
            clients.push(client);
        }
        for _ in 0..2 {
            held.push(incoming.next().await.unwrap().unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.shed_full.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the third was not refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.open.load(Ordering::Relaxed), 2);
    }
}
