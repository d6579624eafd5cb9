//! Who may ask the IdP about a token Valet has not seen answered, so that a flood
//! of random tokens costs its senders, not the users.
//!
//! A token the IdP never issued and a token it issued a second ago look alike
//! until the IdP answers; what tells them apart is who sends them. So the
//! introspection slots are shared like this:
//! - a token already answered active once (a re-validation after `cache_ttl`) may
//!   take any slot; the others leave `revalidation_reserve` slots to it;
//! - a client (Envoy's `source.address`: an IPv4 host, an IPv6 /64) holds at most
//!   `max_in_flight_per_client` slots, and is charged one for every new token of
//!   its that the IdP did not answer active (inactive, or refused with 429). A
//!   client in debt is *suspect*: it may owe at most `inactive_budget`, repaid at
//!   `inactive_per_second` (so a flood from one client reaches the IdP at that
//!   rate), suspects together hold at most half of the slots for new tokens, and
//!   while the IdP asks Valet to slow down (429, or 503 with Retry-After) they are
//!   not sent at all; the pause doubles while the IdP keeps refusing;
//! - a Check without a client address (HTTP mode) has only the global bounds.
//!
//! Nothing here waits: a Check that cannot have a slot is answered at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::address;

/// Clients remembered per provider (~40 bytes each); past it, unknown clients are
/// treated as suspects until a sweep frees room.
const MAX_CLIENTS: usize = 16_384;
/// The first pause when the IdP gives no Retry-After.
const BASE_BACKOFF: Duration = Duration::from_secs(1);

/// A client as the IdP's budget sees it: an IPv4 address, or an IPv6 /64 (one
/// host can take a whole /64, so counting its addresses apart would be free).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    V4(u32),
    V6(u64),
}

impl Client {
    pub fn parse(addr: &str) -> Option<Client> {
        match addr.parse::<IpAddr>().ok()?.to_canonical() {
            IpAddr::V4(a) => Some(Client::V4(a.into())),
            IpAddr::V6(a) => Some(Client::V6((u128::from(a) >> 64) as u64)),
        }
    }

    /// The downstream client Envoy names in `attributes.source.address`.
    pub fn of(req: &CheckRequest) -> Option<Client> {
        let address = req
            .attributes
            .as_ref()?
            .source
            .as_ref()?
            .address
            .as_ref()?
            .address
            .as_ref()?;
        match address {
            address::Address::SocketAddress(s) => Client::parse(&s.address),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub slots: usize,
    pub revalidation_reserve: usize,
    pub per_client: u32,
    pub inactive_budget: f64,
    pub inactive_per_second: f64,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The token was answered active before: a re-validation.
    Known,
    New(Option<Client>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// No slot left for this lane.
    Busy,
    /// The client holds its share of slots.
    ClientBusy,
    /// The client owes its whole inactive budget.
    ClientBudget,
    /// The IdP asked to slow down and the client is suspect.
    Backoff,
}

impl Shed {
    pub fn label(self) -> &'static str {
        match self {
            Shed::Busy => "busy",
            Shed::ClientBusy => "client_busy",
            Shed::ClientBudget => "client_budget",
            Shed::Backoff => "backoff",
        }
    }
}

/// How a request ended, for the client's account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Active,
    /// Inactive, or refused by the IdP's rate limit: charged to the client.
    Charged,
    /// The IdP failed (timeout, error): not the client's doing.
    Neutral,
}

pub struct Gate {
    limits: Limits,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    in_use: usize,
    suspects_in_use: usize,
    clients: HashMap<Client, Account>,
    swept: Option<Instant>,
    backoff_until: Option<Instant>,
    /// The current pause; doubles while the IdP keeps refusing.
    backoff_step: Duration,
}

struct Account {
    in_flight: u32,
    /// Unanswered-active tokens not yet repaid (decays at `inactive_per_second`).
    owed: f64,
    at: Instant,
}

impl Account {
    fn settle(&mut self, now: Instant, rate: f64) {
        if now <= self.at {
            return;
        }
        let paid = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.owed = (self.owed - paid).max(0.0);
        self.at = now;
    }
}

/// One slot, given back on drop; `outcome` settles the client's account.
pub struct Permit {
    gate: Arc<Gate>,
    lane: Lane,
    suspect: bool,
    /// The client has an account (there was room for it).
    tracked: bool,
    outcome: Outcome,
}

impl Permit {
    /// Sent for a client in debt: its failures do not open the circuit for all.
    pub fn suspect(&self) -> bool {
        self.suspect
    }

    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release(self);
    }
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn acquire(self: &Arc<Self>, lane: Lane, now: Instant) -> Result<Permit, Shed> {
        let l = &self.limits;
        let new_slots = l.slots.saturating_sub(l.revalidation_reserve).max(1);
        let mut g = self.lock();
        let mut tracked = false;
        let backing_off = g.backoff_until.is_some_and(|u| now < u);
        let suspect = match lane {
            Lane::Known => {
                if g.in_use >= l.slots {
                    return Err(Shed::Busy);
                }
                false
            }
            Lane::New(None) => {
                if g.in_use >= new_slots {
                    return Err(Shed::Busy);
                }
                false
            }
            Lane::New(Some(c)) => {
                let rate = l.inactive_per_second;
                let (in_flight, owed, known) = match g.clients.get_mut(&c) {
                    Some(a) => {
                        a.settle(now, rate);
                        (a.in_flight, a.owed, true)
                    }
                    None => (0, 0.0, false),
                };
                if !known && g.clients.len() >= MAX_CLIENTS {
                    g.sweep(now, rate);
                }
                let room = known || g.clients.len() < MAX_CLIENTS;
                if in_flight >= l.per_client {
                    return Err(Shed::ClientBusy);
                }
                if owed >= 1.0 && owed + f64::from(in_flight) + 1.0 > l.inactive_budget {
                    return Err(Shed::ClientBudget);
                }
                // A client Valet has no room to remember is as suspect as one in debt.
                let suspect = !room || owed >= 1.0;
                if suspect && backing_off {
                    return Err(Shed::Backoff);
                }
                if g.in_use >= new_slots || (suspect && g.suspects_in_use >= (new_slots / 2).max(1))
                {
                    return Err(Shed::Busy);
                }
                if room {
                    g.clients
                        .entry(c)
                        .or_insert(Account {
                            in_flight: 0,
                            owed: 0.0,
                            at: now,
                        })
                        .in_flight += 1;
                }
                tracked = room;
                suspect
            }
        };
        g.in_use += 1;
        if suspect {
            g.suspects_in_use += 1;
        }
        Ok(Permit {
            gate: self.clone(),
            lane,
            suspect,
            tracked,
            outcome: Outcome::Neutral,
        })
    }

    fn release(&self, p: &Permit) {
        let now = Instant::now();
        let rate = self.limits.inactive_per_second;
        let mut g = self.lock();
        g.in_use -= 1;
        if p.suspect {
            g.suspects_in_use -= 1;
        }
        if let Lane::New(Some(c)) = p.lane
            && p.tracked
            && let Some(a) = g.clients.get_mut(&c)
        {
            a.settle(now, rate);
            a.in_flight = a.in_flight.saturating_sub(1);
            if p.outcome == Outcome::Charged {
                a.owed += 1.0;
            }
            if a.in_flight == 0 && a.owed == 0.0 {
                g.clients.remove(&c);
            }
        }
    }

    /// The IdP asked to slow down: pause suspects for `retry_after` (its header), or
    /// for a pause that doubles while it keeps asking, up to `max_backoff`.
    /// Returns true when this starts a new pause.
    pub fn back_off(&self, retry_after: Option<Duration>, now: Instant) -> bool {
        let mut g = self.lock();
        let max = self.limits.max_backoff;
        if let Some(until) = g.backoff_until
            && now < until
        {
            return false;
        }
        // A refusal soon after the last pause ended doubles it; a later one starts over.
        let recent = g
            .backoff_until
            .is_some_and(|until| now.saturating_duration_since(until) < g.backoff_step * 2);
        g.backoff_step = if recent {
            (g.backoff_step * 2).min(max)
        } else {
            BASE_BACKOFF.min(max)
        };
        let pause = retry_after.unwrap_or_default().max(g.backoff_step).min(max);
        g.backoff_until = Some(now + pause);
        true
    }

    /// Clients in debt now.
    #[cfg(test)]
    fn suspects(&self) -> usize {
        let now = Instant::now();
        let rate = self.limits.inactive_per_second;
        let mut g = self.lock();
        let mut n = 0;
        for a in g.clients.values_mut() {
            a.settle(now, rate);
            n += usize::from(a.owed >= 1.0);
        }
        n
    }
}

impl Inner {
    /// Forgets repaid clients, at most once a second (the map is full: an expensive
    /// scan must not run per Check).
    fn sweep(&mut self, now: Instant, rate: f64) {
        if self
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        self.swept = Some(now);
        self.clients.retain(|_, a| {
            a.settle(now, rate);
            a.in_flight > 0 || a.owed > 0.0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            slots: 16,
            revalidation_reserve: 2,
            per_client: 4,
            inactive_budget: 5.0,
            inactive_per_second: 2.0,
            max_backoff: Duration::from_secs(8),
        }
    }

    #[test]
    fn clients_are_hosts_and_ipv6_slash_64s() {
        assert_eq!(Client::parse("192.0.2.1"), Some(Client::V4(0xc000_0201)));
        assert_eq!(
            Client::parse("::ffff:192.0.2.1"),
            Client::parse("192.0.2.1")
        );
        assert_eq!(
            Client::parse("2001:db8:1:2::1"),
            Client::parse("2001:db8:1:2:ffff::9")
        );
        assert_ne!(
            Client::parse("2001:db8:1:2::1"),
            Client::parse("2001:db8:1:3::1")
        );
        assert_eq!(Client::parse("not an address"), None);
    }

    #[test]
    fn a_client_holds_its_share_and_pays_for_inactive_answers() {
        let g = Gate::new(limits());
        let now = Instant::now();
        let a = Lane::New(Client::parse("192.0.2.1"));
        let held: Vec<_> = (0..4).map(|_| g.acquire(a, now).unwrap()).collect();
        assert_eq!(g.acquire(a, now).err(), Some(Shed::ClientBusy));
        for mut p in held {
            p.set_outcome(Outcome::Charged);
        }
        // Owes 4 of 5: one more in flight at most.
        let p = g.acquire(a, now).unwrap();
        assert_eq!(g.acquire(a, now).err(), Some(Shed::ClientBudget));
        drop(p);
        // Another client is untouched.
        assert!(g.acquire(Lane::New(Client::parse("10.0.0.1")), now).is_ok());
        assert_eq!(g.suspects(), 1);
    }

    #[test]
    fn slots_for_new_tokens_leave_room_for_revalidations_and_clean_clients() {
        let g = Gate::new(limits());
        let now = Instant::now();
        // Five suspects (each owes one).
        for i in 0..5 {
            let lane = Lane::New(Client::parse(&format!("192.0.2.{i}")));
            g.acquire(lane, now).unwrap().set_outcome(Outcome::Charged);
        }
        let mut held = Vec::new();
        for i in 0..5 {
            let lane = Lane::New(Client::parse(&format!("192.0.2.{i}")));
            while let Ok(p) = g.acquire(lane, now) {
                held.push(p);
            }
        }
        assert_eq!(
            held.len(),
            7,
            "suspects hold half of the 14 slots for new tokens"
        );
        for i in 0..7 {
            held.push(
                g.acquire(Lane::New(Client::parse(&format!("10.0.0.{i}"))), now)
                    .unwrap(),
            );
        }
        assert_eq!(g.acquire(Lane::New(None), now).err(), Some(Shed::Busy));
        assert!(g.acquire(Lane::Known, now).is_ok(), "the reserve");
    }

    #[test]
    fn backoff_pauses_suspects_only_and_doubles() {
        let g = Gate::new(limits());
        let now = Instant::now();
        let bad = Lane::New(Client::parse("192.0.2.1"));
        g.acquire(bad, now).unwrap().set_outcome(Outcome::Charged);
        assert!(g.back_off(None, now));
        assert!(!g.back_off(None, now), "already paused");
        assert_eq!(g.acquire(bad, now).err(), Some(Shed::Backoff));
        assert!(g.acquire(Lane::New(Client::parse("10.0.0.1")), now).is_ok());
        assert!(g.acquire(Lane::New(None), now).is_ok());
        let later = now + Duration::from_millis(1100);
        assert!(g.acquire(bad, later).is_ok(), "the pause ended");
        assert!(g.back_off(Some(Duration::from_millis(100)), later));
        assert_eq!(g.lock().backoff_step, Duration::from_secs(2), "doubled");
        assert_eq!(g.lock().backoff_until, Some(later + Duration::from_secs(2)));
        let much_later = later + Duration::from_secs(60);
        assert!(g.back_off(Some(Duration::from_secs(60)), much_later));
        assert_eq!(
            g.lock().backoff_until,
            Some(much_later + Duration::from_secs(8)),
            "Retry-After is capped by max_backoff"
        );
    }

    #[test]
    fn debts_are_repaid_and_forgotten() {
        let g = Gate::new(limits());
        let now = Instant::now();
        let c = Lane::New(Client::parse("192.0.2.1"));
        for _ in 0..4 {
            g.acquire(c, now).unwrap().set_outcome(Outcome::Charged);
        }
        assert_eq!(g.suspects(), 1);
        // Repaid at 2 a second: 2s later nothing is owed, and a release forgets it.
        let later = Instant::now() + Duration::from_secs(2);
        let p = g.acquire(c, later).unwrap();
        assert!(!p.suspect);
        drop(p);
        assert!(g.lock().clients.is_empty());
    }
}
