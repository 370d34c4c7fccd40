//! Console sessions: who logged in with which token, held on the server, named in a cookie.
//!
//! Rules:
//! - A session is made only by presenting an `auditor` or `admin` bearer token at the login
//!   form; the token is checked exactly as the gRPC interceptor checks it
//!   ([`crate::auth::tokens::TokenCheck::check`]). The session keeps the token's name, role and
//!   hash, never the token.
//! - Its id is 32 random bytes (hex) from the operating system; the cookie carries only the
//!   id, `HttpOnly; Secure; SameSite=Strict; Path=/`, with a `Max-Age` of the session's life.
//! - A session ends at its absolute expiry ([`SessionLimits::lifetime_ms`], 8 h by default),
//!   after [`SessionLimits::idle_ms`] without a request (30 min), at logout, or when its token
//!   is revoked (checked at every request, as the interceptor checks at every call). Expired
//!   sessions are dropped when next seen and by a sweep at every login.
//! - Every session has its own CSRF token (32 random bytes, hex), which every POST form of the
//!   console carries and which is compared in constant time ([`same_secret`]).
//! - Sessions live in this process's memory: a restart logs everyone out (nothing about them
//!   is worth keeping in the ledger), and several collectors behind one address need sticky
//!   routing for the console.
//! - Login attempts are limited per client address ([`LoginLimiter`]: a burst of
//!   [`LOGIN_BURST`], then one every [`LOGIN_EVERY`]); an attempt past it is answered 429 with
//!   `Retry-After` before any token is looked at. Tokens are 256-bit random, so the limit is
//!   not what keeps them from being guessed; it keeps a client that tries token after token
//!   from costing the store a lookup each, and makes such a client visible in the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::tokens::{Caller, Role};

/// The cookie's name.
pub const COOKIE: &str = "gpm_session";

/// How long sessions live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub lifetime_ms: i64,
    pub idle_ms: i64,
    /// Most sessions held at once; a login past it drops the oldest.
    pub max_sessions: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            lifetime_ms: 8 * 3_600_000,
            idle_ms: 30 * 60_000,
            max_sessions: 10_000,
        }
    }
}

/// Login attempts one address may make at once.
pub const LOGIN_BURST: u32 = 10;
/// After the burst, one more attempt per this long.
pub const LOGIN_EVERY: Duration = Duration::from_secs(6);
/// Addresses tracked before those that have not tried for a while are forgotten.
const LOGIN_TRACKED_MAX: usize = 10_000;

/// Login attempts per client address (GCRA through `governor`).
pub struct LoginLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginLimiter")
            .field("tracked", &self.limiter.len())
            .finish()
    }
}

impl Default for LoginLimiter {
    fn default() -> Self {
        let burst = NonZeroU32::new(LOGIN_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(LOGIN_EVERY)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }
}

impl LoginLimiter {
    /// Counts an attempt from `ip`: Ok, or how long until it may try again.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.limiter.len() > LOGIN_TRACKED_MAX {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// One logged-in person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// The token's name and role.
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token (hex), to see a revocation.
    pub token_hash: String,
    pub csrf: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub last_seen_ms: i64,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Why no session could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the system's random source failed: {0}")]
    Random(String),
}

/// 32 random bytes, hex.
pub fn random_hex() -> Result<String, SessionError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| SessionError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The sessions this console holds.
#[derive(Debug, Default)]
pub struct Sessions {
    limits: SessionLimits,
    held: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `caller` (whose token hashes to `token_hash`), at `now_ms`.
    pub fn create(
        &self,
        caller: &Caller,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Session, SessionError> {
        let s = Session {
            id: random_hex()?,
            name: caller.name.clone(),
            role: caller.role,
            token_hash: token_hash.to_string(),
            csrf: random_hex()?,
            created_ms: now_ms,
            expires_ms: now_ms + self.limits.lifetime_ms,
            last_seen_ms: now_ms,
        };
        let mut held = self.held();
        let limits = self.limits;
        held.retain(|_, s| live(s, now_ms, limits));
        while held.len() >= limits.max_sessions.max(1) {
            let Some(oldest) = held
                .values()
                .min_by_key(|s| s.created_ms)
                .map(|s| s.id.clone())
            else {
                break;
            };
            held.remove(&oldest);
        }
        held.insert(s.id.clone(), s.clone());
        Ok(s)
    }

    /// The live session `id` names, its idle time restarted; an expired one is dropped.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Session> {
        let mut held = self.held();
        let limits = self.limits;
        let s = held.get_mut(id)?;
        if !live(s, now_ms, limits) {
            held.remove(id);
            return None;
        }
        s.last_seen_ms = now_ms;
        Some(s.clone())
    }

    /// Ends a session (logout, or its token revoked).
    pub fn remove(&self, id: &str) {
        self.held().remove(id);
    }

    pub fn len(&self) -> usize {
        self.held().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(s: &Session, now_ms: i64, limits: SessionLimits) -> bool {
    now_ms < s.expires_ms && now_ms < s.last_seen_ms + limits.idle_ms
}

/// The `Set-Cookie` value that names `session`.
pub fn set_cookie(session: &Session, now_ms: i64) -> String {
    let max_age = ((session.expires_ms - now_ms) / 1000).max(0);
    cookie::Cookie::build((COOKIE, session.id.clone()))
        .http_only(true)
        .secure(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .max_age(cookie::time::Duration::seconds(max_age))
        .build()
        .to_string()
}

/// The `Set-Cookie` value that ends the session cookie in the browser.
pub fn clear_cookie() -> String {
    cookie::Cookie::build((COOKIE, ""))
        .http_only(true)
        .secure(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .max_age(cookie::time::Duration::ZERO)
        .build()
        .to_string()
}

/// The value of cookie `name` in a `Cookie` request header.
pub fn cookie_value(header: &str, name: &str) -> Option<String> {
    cookie::Cookie::split_parse(header)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role) -> Caller {
        Caller {
            name: "kim".into(),
            role,
        }
    }

    #[test]
    fn a_session_lives_until_its_expiry_or_its_idle_limit_or_logout() {
        let limits = SessionLimits {
            lifetime_ms: 10_000,
            idle_ms: 3_000,
            max_sessions: 10,
        };
        let s = Sessions::new(limits);
        let a = s.create(&caller(Role::Auditor), "h", 1_000).unwrap();
        assert_eq!(a.id.len(), 64);
        assert_eq!(a.csrf.len(), 64);
        assert_ne!(a.id, a.csrf);
        // Used every 2 s it stays, up to its absolute expiry.
        for t in [3_000, 5_000, 7_000, 9_000, 10_999] {
            assert!(s.get(&a.id, t).is_some(), "{t}");
        }
        assert!(s.get(&a.id, 11_000).is_none());
        assert!(s.is_empty(), "an expired session is dropped when seen");
        // Idle past 3 s: gone.
        let b = s.create(&caller(Role::Admin), "h", 20_000).unwrap();
        assert!(s.get(&b.id, 23_000).is_none());
        // Logout.
        let c = s.create(&caller(Role::Admin), "h", 30_000).unwrap();
        assert!(s.get(&c.id, 30_001).unwrap().is_admin());
        s.remove(&c.id);
        assert!(s.get(&c.id, 30_002).is_none());
        assert!(s.get("not-a-session", 30_002).is_none());
    }

    #[test]
    fn ids_are_random_and_the_oldest_session_goes_past_the_limit() {
        let s = Sessions::new(SessionLimits {
            max_sessions: 2,
            ..SessionLimits::default()
        });
        let a = s.create(&caller(Role::Auditor), "h", 1).unwrap();
        let b = s.create(&caller(Role::Auditor), "h", 2).unwrap();
        let c = s.create(&caller(Role::Auditor), "h", 3).unwrap();
        assert!(a.id != b.id && b.id != c.id && a.id != c.id);
        assert_eq!(s.len(), 2);
        assert!(s.get(&a.id, 4).is_none());
        assert!(s.get(&c.id, 4).is_some());
    }

    #[test]
    fn the_cookie_is_http_only_secure_strict_and_site_wide() {
        let s = Sessions::new(SessionLimits::default());
        let a = s.create(&caller(Role::Auditor), "h", 0).unwrap();
        let c = set_cookie(&a, 0);
        assert!(c.starts_with(&format!("{COOKIE}={}", a.id)), "{c}");
        for attr in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=28800",
        ] {
            assert!(c.contains(attr), "{attr} in {c}");
        }
        let gone = clear_cookie();
        assert!(
            gone.contains("Max-Age=0") && gone.contains("HttpOnly"),
            "{gone}"
        );
        let header = format!("lang=ko; {COOKIE}={}; other=1", a.id);
        assert_eq!(cookie_value(&header, COOKIE), Some(a.id.clone()));
        assert_eq!(cookie_value("lang=ko", COOKIE), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }
}
