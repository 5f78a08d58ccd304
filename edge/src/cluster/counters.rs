//! Counters every edge shares: failed logins (the login throttle) and
//! request rates (GCRA). Each update is one Lua script, atomic on the
//! server and timed by the server's clock, so edges with skewed clocks
//! still count against one limit.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Cluster, ClusterError, key};

/// How long checks counted as running stay counted at most: from the first
/// of a run of them, so a count an edge never settled (it died mid-check)
/// lapses even while checks keep coming (an argon2 check takes well under
/// a second).
pub const PENDING_TTL: Duration = Duration::from_secs(30);

/// One throttle counter of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKey {
    /// `addr:…`, `user:…`, `unknown` or `device:…`.
    pub name: String,
    /// Failures allowed before it locks.
    pub free: u32,
    /// A bucket shared by many (unknown names): a success does not clear it.
    pub bucket: bool,
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The password was wrong: a failure.
    Failed,
    /// The password was right: the counters are cleared.
    Succeeded,
    /// Not checked after all: nothing counts.
    Released,
    /// A failure that was no check (nothing was pending).
    Counted,
}

/// The lock lengths, as the local throttle has them.
#[derive(Debug, Clone, Copy)]
pub struct LockTimes {
    pub base: Duration,
    pub max: Duration,
    pub forget: Duration,
}

const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: counter, pending, counter, pending, ...; ARGV: free each, base.
/// Returns 0 when the check may run (its pending counts raised), else
/// the wait in milliseconds.
const BEGIN: &str = r"
local n = #KEYS / 2
local wait = 0
for i = 1, n do
  local l = tonumber(redis.call('HGET', KEYS[2*i-1], 'l') or '0') or 0
  if l - now > wait then wait = l - now end
end
if wait > 0 then return wait end
for i = 1, n do
  local pend = tonumber(redis.call('GET', KEYS[2*i]) or '0') or 0
  local f = tonumber(redis.call('HGET', KEYS[2*i-1], 'f') or '0') or 0
  if pend > 0 and f + pend >= tonumber(ARGV[i]) then return tonumber(ARGV[n+1]) end
end
for i = 1, n do
  if redis.call('INCR', KEYS[2*i]) == 1 then
    redis.call('PEXPIRE', KEYS[2*i], ARGV[n+2])
  end
end
return 0";

/// KEYS as for BEGIN; ARGV: outcome, free each, bucket each, base, max,
/// forget (ms).
const SETTLE: &str = r"
local n = #KEYS / 2
local outcome = ARGV[1]
local base, max, forget = tonumber(ARGV[2*n+2]), tonumber(ARGV[2*n+3]), tonumber(ARGV[2*n+4])
for i = 1, n do
  local h, p = KEYS[2*i-1], KEYS[2*i]
  if outcome ~= 'count' then
    local pend = tonumber(redis.call('GET', p) or '0') or 0
    if pend > 1 then redis.call('DECR', p) else redis.call('DEL', p) end
  end
  if outcome == 'fail' or outcome == 'count' then
    local f = redis.call('HINCRBY', h, 'f', 1)
    local over = f - tonumber(ARGV[1+i])
    local lock = 0
    if over > 0 then
      lock = math.min(base * (2 ^ math.min(over - 1, 20)), max)
      redis.call('HSET', h, 'l', string.format('%.0f', now + lock))
    end
    redis.call('PEXPIRE', h, string.format('%.0f', lock + forget))
  elseif outcome == 'ok' and ARGV[1+n+i] == '0' then
    redis.call('DEL', h)
  end
end
return 0";

/// KEYS: counters; returns the longest lock left (ms), 0 if none.
const CHECK: &str = r"
local wait = 0
for i = 1, #KEYS do
  local l = tonumber(redis.call('HGET', KEYS[i], 'l') or '0') or 0
  if l - now > wait then wait = l - now end
end
return wait";

/// GCRA. KEYS: the key; ARGV: interval, burst (µs and count). Returns 0
/// when served (the arrival time pushed), else the wait in µs.
const RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then return math.max(1, math.ceil(ahead - tolerance)) end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', string.format('%.0f', math.ceil((next - now) / 1000) + 1000))
return 0";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW_MS}{body}"))
}

// Hashed once: each call sends EVALSHA, and the body only when the server
// has not seen it (after a restart of Redis).
static BEGIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(BEGIN));
static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(SETTLE));
static CHECK_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CHECK));
static RATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RATE));

fn counter_keys(keys: &[SharedKey]) -> Vec<String> {
    keys.iter()
        .flat_map(|k| {
            let counter = key(&["throttle", &k.name]);
            let pending = format!("{counter}:pending");
            [counter, pending]
        })
        .collect()
}

impl Cluster {
    /// Starts a shared check: `Ok(Err(wait))` when a counter is locked, or
    /// when the checks running on every edge would use up its free
    /// failures.
    pub async fn throttle_begin(
        &self,
        keys: &[SharedKey],
        base: Duration,
    ) -> Result<Result<(), Duration>, ClusterError> {
        let mut con = self.connection();
        let mut inv = BEGIN_SCRIPT.prepare_invoke();
        for k in counter_keys(keys) {
            inv.key(k);
        }
        for k in keys {
            inv.arg(k.free);
        }
        inv.arg(ms(base)).arg(ms(PENDING_TTL));
        let wait: u64 = self.call(inv.invoke_async(&mut con)).await?;
        Ok(match wait {
            0 => Ok(()),
            w => Err(Duration::from_millis(w)),
        })
    }

    /// Ends a shared check (or counts a failure that was no check).
    pub async fn throttle_settle(
        &self,
        keys: &[SharedKey],
        outcome: Outcome,
        times: LockTimes,
    ) -> Result<(), ClusterError> {
        let mut con = self.connection();
        let mut inv = SETTLE_SCRIPT.prepare_invoke();
        for k in counter_keys(keys) {
            inv.key(k);
        }
        inv.arg(match outcome {
            Outcome::Failed => "fail",
            Outcome::Succeeded => "ok",
            Outcome::Released => "none",
            Outcome::Counted => "count",
        });
        for k in keys {
            inv.arg(k.free);
        }
        for k in keys {
            inv.arg(if k.bucket { "1" } else { "0" });
        }
        inv.arg(ms(times.base))
            .arg(ms(times.max))
            .arg(ms(times.forget));
        match outcome {
            // A failure that was no check goes through the health flag
            // like any new command: refused at once while Redis is away.
            Outcome::Counted => self.call(inv.invoke_async::<()>(&mut con)).await,
            // A check that began must end, even if another command just
            // found Redis slow.
            _ => Self::timed(inv.invoke_async::<()>(&mut con)).await,
        }
    }

    /// `Ok(Err(wait))` when any of `keys` is locked on the cluster.
    pub async fn throttle_check(
        &self,
        keys: &[SharedKey],
    ) -> Result<Result<(), Duration>, ClusterError> {
        let mut con = self.connection();
        let mut inv = CHECK_SCRIPT.prepare_invoke();
        for k in keys {
            inv.key(key(&["throttle", &k.name]));
        }
        let wait: u64 = self.call(inv.invoke_async(&mut con)).await?;
        Ok(match wait {
            0 => Ok(()),
            w => Err(Duration::from_millis(w)),
        })
    }

    /// Counts a request against the shared rate limit `name`: one per
    /// `interval` on average, `burst` more at once. `Ok(Err(wait))` when
    /// over it.
    pub async fn rate(
        &self,
        name: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Result<(), Duration>, ClusterError> {
        let mut con = self.connection();
        let interval = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        let wait: u64 = self
            .call(
                RATE_SCRIPT
                    .key(key(&["rate", name]))
                    .arg(interval)
                    .arg(burst)
                    .invoke_async(&mut con),
            )
            .await?;
        Ok(match wait {
            0 => Ok(()),
            w => Err(Duration::from_micros(w)),
        })
    }
}
