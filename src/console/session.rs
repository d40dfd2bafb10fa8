//! Reviewer sessions, server-side: a random id in an HttpOnly, SameSite=Strict cookie names an
//! entry here holding the reviewer's name and the session's CSRF token. An entry idle longer
//! than the timeout is gone; signing out removes it. Bounded: at most `MAX_SESSIONS` live at
//! once (expired ones are swept when a session is created).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sessions held at most; a sign-in past it is refused until some expire.
pub const MAX_SESSIONS: usize = 10_000;

/// The cookie naming the session.
pub const COOKIE: &str = "regionguard_session";

/// A signed-in reviewer, as a request sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub reviewer: String,
    /// Every form carries it back (`csrf`); a post without it changes nothing.
    pub csrf: String,
    /// A one-shot message for the next page (what the last action did).
    pub flash: Option<String>,
}

struct Entry {
    reviewer: String,
    csrf: String,
    flash: Option<String>,
    last_seen: Instant,
}

pub struct Sessions {
    idle: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

/// 244 random bits from two v4 UUIDs (the process's CSPRNG), as 64 hex digits.
fn secret() -> String {
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    format!("{}{}", a.simple(), b.simple())
}

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for `reviewer`. At `MAX_SESSIONS`, idle ones are swept, then the least
    /// recently used goes.
    pub fn create(&self, reviewer: &str, now: Instant) -> Option<Session> {
        let mut entries = self.lock();
        if entries.len() >= MAX_SESSIONS {
            entries.retain(|_, e| now.duration_since(e.last_seen) < self.idle);
        }
        if entries.len() >= MAX_SESSIONS {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(id, _)| id.clone())?;
            entries.remove(&oldest);
        }
        let session = Session {
            id: secret(),
            reviewer: reviewer.to_owned(),
            csrf: secret(),
            flash: None,
        };
        entries.insert(
            session.id.clone(),
            Entry {
                reviewer: session.reviewer.clone(),
                csrf: session.csrf.clone(),
                flash: None,
                last_seen: now,
            },
        );
        Some(session)
    }

    /// The live session `id` names (its flash taken), touched; an idle one is removed.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut entries = self.lock();
        let entry = entries.get_mut(id)?;
        if now.duration_since(entry.last_seen) >= self.idle {
            entries.remove(id);
            return None;
        }
        entry.last_seen = now;
        Some(Session {
            id: id.to_owned(),
            reviewer: entry.reviewer.clone(),
            csrf: entry.csrf.clone(),
            flash: entry.flash.take(),
        })
    }

    /// The live session of a reviewer an SSO proxy names, if one was made for them: a browser
    /// that drops the cookie (a link from another site under SameSite=Strict) gets it back
    /// rather than a new session each time.
    pub fn for_identity(&self, reviewer: &str, now: Instant) -> Option<Session> {
        let id = {
            let entries = self.lock();
            entries
                .iter()
                .filter(|(_, e)| {
                    e.reviewer == reviewer && now.duration_since(e.last_seen) < self.idle
                })
                .max_by_key(|(_, e)| e.last_seen)
                .map(|(id, _)| id.clone())?
        };
        self.get(&id, now)
    }

    /// Leaves a message for the session's next page.
    pub fn flash(&self, id: &str, message: String) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.flash = Some(message);
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Failed sign-ins an address may make within `FAILURE_WINDOW` before it is refused until the
/// window ends (a reviewer mistyping a token is not locked out for long; a guesser gets ten
/// tries a minute).
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed sign-ins per client address (unknown addresses share one count), bounded.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<Option<std::net::IpAddr>, (Instant, u32)>>);

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Option<std::net::IpAddr>, (Instant, u32)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `address` has used up its failures in the current window.
    pub fn refused(&self, address: Option<std::net::IpAddr>, now: Instant) -> bool {
        self.lock().get(&address).is_some_and(|(since, n)| {
            now.duration_since(*since) < FAILURE_WINDOW && *n >= MAX_FAILURES
        })
    }

    pub fn failed(&self, address: Option<std::net::IpAddr>, now: Instant) {
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, (since, _)| now.duration_since(*since) < FAILURE_WINDOW);
        }
        let entry = map.entry(address).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// Compares in time independent of where the strings differ (CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_while_used_and_ends_when_idle_or_removed() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let s = sessions.create("alice", t0).unwrap();
        assert_eq!(s.id.len(), 64);
        assert_ne!(s.id, s.csrf);
        let later = t0 + Duration::from_secs(50);
        assert_eq!(sessions.get(&s.id, later).unwrap().reviewer, "alice");
        // Touched at 50 s: alive at 100 s, gone 60 s after the last use.
        assert!(sessions.get(&s.id, t0 + Duration::from_secs(100)).is_some());
        assert!(sessions.get(&s.id, t0 + Duration::from_secs(160)).is_none());
        assert_eq!(sessions.len(), 0);
        let s = sessions.create("bob", t0).unwrap();
        assert_eq!(sessions.for_identity("bob", t0).unwrap().id, s.id);
        sessions.remove(&s.id);
        assert!(sessions.get(&s.id, t0).is_none());
        assert!(sessions.for_identity("bob", t0).is_none());
        assert!(sessions.get("not-a-session", t0).is_none());
    }

    #[test]
    fn an_address_gets_ten_failures_a_minute() {
        let failures = Failures::default();
        let (t0, a, b) = (
            Instant::now(),
            Some([10, 0, 0, 1].into()),
            Some([10, 0, 0, 2].into()),
        );
        for _ in 0..MAX_FAILURES {
            assert!(!failures.refused(a, t0));
            failures.failed(a, t0);
        }
        assert!(failures.refused(a, t0));
        assert!(!failures.refused(b, t0), "another address is not held back");
        assert!(!failures.refused(a, t0 + FAILURE_WINDOW));
    }

    #[test]
    fn a_flash_is_shown_once() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let now = Instant::now();
        let s = sessions.create("alice", now).unwrap();
        sessions.flash(&s.id, "done".into());
        assert_eq!(
            sessions.get(&s.id, now).unwrap().flash.as_deref(),
            Some("done")
        );
        assert_eq!(sessions.get(&s.id, now).unwrap().flash, None);
    }

    #[test]
    fn cookies_and_secrets_are_read_exactly() {
        assert_eq!(
            cookie("a=1; regionguard_session=abc; b=2", COOKIE),
            Some("abc")
        );
        assert_eq!(cookie("xregionguard_session=abc", COOKIE), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
