//! The sign-in throttle: failed sign-ins counted per account and per client address; past the
//! allowance, that account or address is refused (even with the right password) for a while.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed sign-ins allowed per account before it is held back.
pub const ACCOUNT_BURST: u32 = 5;
/// Failed sign-ins allowed per client address before it is held back.
pub const ADDRESS_BURST: u32 = 20;
/// One more failed attempt is allowed per account after this long.
const ACCOUNT_REPLENISH: Duration = Duration::from_secs(60);
/// One more failed attempt is allowed per address after this long.
const ADDRESS_REPLENISH: Duration = Duration::from_secs(10);
/// Lock-outs and counters kept at most this many keys before old ones are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// Whether a sign-in may be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check the password.
    Go,
    /// Too many failures: answer 429 without checking the password.
    Wait(Duration),
}

struct Keyed<K: std::hash::Hash + Eq + Clone> {
    failures: DefaultKeyedRateLimiter<K>,
    locked_until: Mutex<HashMap<K, Instant>>,
}

impl<K: std::hash::Hash + Eq + Clone> Keyed<K> {
    fn new(burst: u32, replenish: Duration) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(replenish)
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            failures: RateLimiter::keyed(quota),
            locked_until: Mutex::new(HashMap::new()),
        }
    }

    fn wait(&self, key: &K, now: Instant) -> Option<Duration> {
        let locked = self.locked_until.lock().unwrap_or_else(|e| e.into_inner());
        locked
            .get(key)
            .and_then(|until| until.checked_duration_since(now))
    }

    /// Counts one failure; past the allowance the key is locked until the next one is allowed.
    fn fail(&self, key: &K, now: Instant) {
        if let Err(not_until) = self.failures.check_key(key) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut locked = self.locked_until.lock().unwrap_or_else(|e| e.into_inner());
            if locked.len() > PRUNE_ABOVE {
                locked.retain(|_, until| *until > now);
                self.failures.retain_recent();
            }
            locked.insert(key.clone(), now + wait);
        }
    }
}

/// Failed sign-ins per account (lower-cased e-mail, known or not) and per client address.
pub struct SignInThrottle {
    accounts: Keyed<String>,
    addresses: Keyed<IpAddr>,
}

impl Default for SignInThrottle {
    fn default() -> Self {
        Self {
            accounts: Keyed::new(ACCOUNT_BURST, ACCOUNT_REPLENISH),
            addresses: Keyed::new(ADDRESS_BURST, ADDRESS_REPLENISH),
        }
    }
}

impl SignInThrottle {
    /// Whether `account` may try to sign in from `address` now.
    pub fn check(&self, account: &str, address: Option<IpAddr>) -> Verdict {
        let now = Instant::now();
        let waits = [
            self.accounts.wait(&account.to_string(), now),
            address.and_then(|a| self.addresses.wait(&a, now)),
        ];
        match waits.into_iter().flatten().max() {
            Some(wait) => Verdict::Wait(wait),
            None => Verdict::Go,
        }
    }

    /// Counts a failed sign-in of `account` from `address`.
    pub fn failed(&self, account: &str, address: Option<IpAddr>) {
        let now = Instant::now();
        self.accounts.fail(&account.to_string(), now);
        if let Some(address) = address {
            self.addresses.fail(&address, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_allowance_hold_the_account_and_the_address_back() {
        let throttle = SignInThrottle::default();
        let ip: IpAddr = [192, 0, 2, 7].into();
        for _ in 0..=ACCOUNT_BURST {
            assert_eq!(throttle.check("a@x.example", Some(ip)), Verdict::Go);
            throttle.failed("a@x.example", Some(ip));
        }
        assert!(matches!(
            throttle.check("a@x.example", Some(ip)),
            Verdict::Wait(_)
        ));
        // Another account from another address is not affected.
        assert_eq!(
            throttle.check("b@x.example", Some([192, 0, 2, 8].into())),
            Verdict::Go
        );
        // Spraying many accounts from one address holds the address back.
        for i in 0..ADDRESS_BURST {
            throttle.failed(&format!("spray{i}@x.example"), Some(ip));
        }
        assert!(matches!(
            throttle.check("fresh@x.example", Some(ip)),
            Verdict::Wait(_)
        ));
    }
}
