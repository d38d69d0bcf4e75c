//! The mapping table: external bindings, MAP and PEER entries, the port
//! allocator and the expiry index.
//!
//! A *binding* is the NAT's endpoint-independent mapping of one internal
//! (address, protocol, port) to one external (address, port). MAP and PEER
//! entries for the same internal endpoint share it (RFC 6887 sections 11.3
//! and 12.3: a PEER for an internal endpoint that already has a mapping
//! gets that mapping's external address and port, and vice versa). A
//! binding lives as long as any entry uses it.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use std::net::{IpAddr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::{Nonce, Protocol};

use crate::change::{FilterRule, MappingKey, MappingKind, MappingRecord, PortHold};
use crate::prefix::canonical;
use crate::{SubscriberKeying, Timestamp};

/// Index of a binding or entry in its slab.
pub(crate) type Id = u32;

/// A vector with stable indices and a free list.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<Id>,
    len: usize,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    fn insert(&mut self, v: T) -> Id {
        self.len += 1;
        if let Some(id) = self.free.pop() {
            self.items[id as usize] = Some(v);
            id
        } else {
            self.items.push(Some(v));
            // The table is bounded by configuration far below 2^32 entries.
            Id::try_from(self.items.len() - 1).unwrap_or(Id::MAX)
        }
    }

    fn remove(&mut self, id: Id) -> Option<T> {
        let v = self.items.get_mut(id as usize)?.take()?;
        self.free.push(id);
        self.len -= 1;
        Some(v)
    }

    pub(crate) fn get(&self, id: Id) -> Option<&T> {
        self.items.get(id as usize)?.as_ref()
    }

    fn get_mut(&mut self, id: Id) -> Option<&mut T> {
        self.items.get_mut(id as usize)?.as_mut()
    }

    /// Slots, used or free.
    pub(crate) fn slots(&self) -> usize {
        self.items.len()
    }

    /// The used slots among `from..from + n`.
    pub(crate) fn iter_range(&self, from: usize, n: usize) -> impl Iterator<Item = (Id, &T)> {
        self.items
            .iter()
            .enumerate()
            .skip(from)
            .take(n)
            .filter_map(|(i, v)| Some((Id::try_from(i).ok()?, v.as_ref()?)))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Id, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((Id::try_from(i).ok()?, v.as_ref()?)))
    }
}

/// An external binding.
#[derive(Debug)]
pub(crate) struct Binding {
    pub(crate) key: MappingKey,
    /// Index into the external address pool, or [`IDENTITY`].
    pub(crate) ext_ip: u16,
    /// External port; 0 when the binding holds the whole address.
    pub(crate) ext_port: u16,
    /// The MAP entry using this binding, if any.
    pub(crate) map_entry: Option<Id>,
    /// Number of PEER entries using this binding.
    pub(crate) peers: u32,
}

/// The `ext_ip` of a binding whose external endpoint is its internal one
/// (RFC 6887 section 1: for a firewall "the external address is the
/// internal address"). Such a binding uses no pool address and holds no
/// external port: no other binding can have its internal endpoint.
pub(crate) const IDENTITY: u16 = u16::MAX;

impl Binding {
    /// Whether the binding translates nothing ([`IDENTITY`]).
    pub(crate) fn is_identity(&self) -> bool {
        self.ext_ip == IDENTITY
    }

    fn ext(&self) -> u64 {
        ext_key(self.key.protocol, self.ext_ip, self.ext_port)
    }
}

/// Rarely present parts of an entry, boxed to keep the common entry small
/// (a plain MAP entry is 40 bytes; see docs/performance.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extra {
    pub(crate) filters: Vec<FilterRule>,
    pub(crate) description: Option<Box<str>>,
    /// The remote peer, for PEER entries.
    pub(crate) remote: Option<SocketAddr>,
    /// The THIRD_PARTY client that made or last renewed it.
    pub(crate) manager: Option<IpAddr>,
}

/// A MAP or PEER mapping.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) binding: Id,
    pub(crate) lifetime: u32,
    pub(crate) expires: Timestamp,
    pub(crate) nonce: Nonce,
    pub(crate) checkpoint: bool,
    /// Check-pointed at some point since it was created here: its record
    /// went to the backup, which keeps following it until it is removed
    /// (see [`crate::Server::replicated_page`]).
    pub(crate) replicated: bool,
    pub(crate) third_party: bool,
    pub(crate) extra: Option<Box<Extra>>,
}

impl Entry {
    /// The remote peer of a PEER entry; `None` for MAP.
    pub(crate) fn remote(&self) -> Option<SocketAddr> {
        self.extra.as_ref().and_then(|x| x.remote)
    }

    /// The THIRD_PARTY client that manages it, if known.
    pub(crate) fn manager(&self) -> Option<IpAddr> {
        self.extra.as_ref().and_then(|x| x.manager)
    }
}

/// Why no external endpoint could be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AllocError {
    /// The suggestion could not be honoured and PREFER_FAILURE forbids
    /// anything else (RFC 6887 section 13.2).
    CannotProvide,
    /// Nothing free (RFC 6887 section 7.4, NO_RESOURCES).
    Exhausted,
}

/// What the client suggested for the external side (RFC 6887 section 11.3).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Suggestion {
    pub(crate) ip: Option<IpAddr>,
    pub(crate) port: u16,
    pub(crate) prefer_failure: bool,
}

/// Where allocation looks for free ports.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    pub(crate) addrs: Vec<IpAddr>,
    pub(crate) port_lo: u16,
    pub(crate) port_hi: u16,
}

#[derive(Debug)]
pub(crate) struct Table {
    pool: Pool,
    pub(crate) bindings: Slab<Binding>,
    /// Bindings by internal key. The index stores only ids and hashes the
    /// binding in the slab, so a slot costs 4 bytes instead of a copy of
    /// the key.
    binding_by_key: HashTable<Id>,
    /// Bindings holding one external port, by [`ext_key`].
    binding_by_ext: HashTable<Id>,
    hasher: DefaultHashBuilder,
    /// Per pool address: the binding that holds the whole address.
    whole: Vec<Option<Id>>,
    /// Per pool address: number of bindings on it.
    on_addr: Vec<u32>,
    /// Per (pool address, protocol): ports in use, to skip full addresses.
    used: HashMap<(u16, Protocol), u32>,
    pub(crate) entries: Slab<Entry>,
    peer_by_flow: HashMap<(Id, SocketAddr), Id>,
    expiry: BTreeSet<(Timestamp, Id)>,
    /// MAP entries in the GET/NEXT order (failure-scenarios draft section
    /// 4.3), so a walk seeks to its locator in O(log n). Keys are packed
    /// ([`OrderKey`]): 24 bytes plus the 4-byte id per slot.
    order: BTreeMap<OrderKey, Id>,
    /// Per pool address: its rank among the pool addresses in 128-bit wire
    /// order, which stands for the external address in [`OrderKey`].
    ext_rank: Vec<u16>,
    /// The pool addresses in 128-bit wire order (index = rank).
    ext_sorted: Vec<u128>,
    rng: u64,
    /// Recently freed endpoints: [`Holds`].
    holds: Holds,
}

/// External endpoints freed recently, held back from every client but
/// the one that held them (RFC 6887 section 15; [`PortHold`]).
///
/// Pruned by [`Table::prune_holds`], which every call that allocates runs
/// first, so every hold present is live. One hold per endpoint: bounded by
/// the pool, whatever the churn.
#[derive(Debug, Default)]
struct Holds {
    /// How long a freed endpoint is held; zero: never.
    delay: std::time::Duration,
    /// The latest `now` the table was told (by `prune_holds`).
    now: Timestamp,
    /// Port holds by [`ext_key`] (their port is never 0).
    ports: HashMap<u64, Hold>,
    /// Per pool address: the hold on the whole address (a freed binding
    /// for all ports).
    whole: Vec<Option<Hold>>,
    /// Per pool address: port holds on it (a whole address is free only
    /// when none is held).
    on_addr: Vec<u32>,
    /// Every hold by its end: `(until, ext_key)`, or `WHOLE | address`
    /// for a whole address.
    order: BTreeSet<(Timestamp, u64)>,
}

/// Marks a whole-address hold in [`Holds::order`]; an `ext_key` never
/// reaches bit 40 (8 + 16 + 16 bits).
const WHOLE: u64 = 1 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    until: Timestamp,
    owner: MappingKey,
    nonce: Nonce,
}

impl Hold {
    /// Whether it keeps the endpoint from `who`.
    ///
    /// RFC 6887 section 15 lets "the same client" reclaim it: "same
    /// internal IP address, internal port, and mapping nonce". The nonce
    /// is what proves ownership (section 11.3), so a client whose internal
    /// address changed and re-creates its mapping with its nonce and its
    /// old external endpoint (failure-scenarios draft section 2.4) is the
    /// same client too: the late traffic the hold keeps from others was
    /// for it. A nonce many clients share (NAT-PMP's, the operator's)
    /// proves nothing, so for those the internal address must match.
    fn bars(&self, who: Option<(&MappingKey, Nonce)>) -> bool {
        let Some((k, n)) = who else {
            return true;
        };
        let shared = n == crate::NATPMP_NONCE || n == crate::STATIC_NONCE;
        let same = n == self.nonce
            && k.protocol == self.owner.protocol
            && k.internal_port == self.owner.internal_port
            && (!shared || k.internal_ip == self.owner.internal_ip);
        !same
    }
}

/// A MAP entry's position in the GET/NEXT order.
///
/// The failure-scenarios draft (section 4.3) only asks for an order that
/// is stable between two GET requests and leaves lexicographic or lifetime
/// order to the implementer. Ours is lexicographic over the fields of the
/// draft's equality, taken in this sequence:
///
/// 1. internal address, as its 128-bit RFC 6887 form (IPv4-mapped for
///    IPv4), which folds the internal address family in: every IPv4
///    address sorts in `::ffff:0:0/96`;
/// 2. protocol;
/// 3. internal port;
/// 4. external address, likewise in its 128-bit form (with the external
///    family folded in);
/// 5. external port.
///
/// The internal address comes first so that one host's mappings, and one
/// subscriber prefix's, form a contiguous range: a walk, which only ever
/// sees the requester's own (section 6), is a range scan. Lifetime order
/// would move a mapping at every renewal and break the walk's
/// no-skip/no-repeat guarantee.
///
/// Packed as `(address high 64 bits, address low 64 bits, protocol << 48 |
/// internal port << 32 | external address rank << 16 | external port)`;
/// the external address is its rank in the sorted pool (every mapping's
/// external address is a pool address), which keeps the key at 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct OrderKey(u64, u64, u64);

/// Bits of [`OrderKey`]'s third word below the protocol, and below the
/// internal port.
const BELOW_PROTOCOL: u64 = (1 << 48) - 1;
const BELOW_INTERNAL_PORT: u64 = (1 << 32) - 1;

impl OrderKey {
    fn new(
        internal: IpAddr,
        protocol: Protocol,
        internal_port: u16,
        rank: u16,
        ext_port: u16,
    ) -> Self {
        let a = u128::from(to_wire(internal));
        OrderKey(
            (a >> 64) as u64,
            a as u64,
            (u64::from(protocol.0) << 48)
                | (u64::from(internal_port) << 32)
                | (u64::from(rank) << 16)
                | u64::from(ext_port),
        )
    }

    /// The range of keys of `internal`'s mappings, narrowed to one
    /// protocol and one internal port when given (zero = any, draft
    /// section 4.1).
    pub(crate) fn host_range(
        internal: IpAddr,
        protocol: Protocol,
        internal_port: u16,
    ) -> (OrderKey, OrderKey) {
        let lo = OrderKey::new(internal, Protocol::ALL, 0, 0, 0);
        let (base, below) = match (protocol.0, internal_port) {
            (0, _) => (0, u64::MAX),
            (p, 0) => (u64::from(p) << 48, BELOW_PROTOCOL),
            (p, port) => (
                (u64::from(p) << 48) | (u64::from(port) << 32),
                BELOW_INTERNAL_PORT,
            ),
        };
        (
            OrderKey(lo.0, lo.1, base),
            OrderKey(lo.0, lo.1, base | below),
        )
    }
}

fn ext_key(protocol: Protocol, ip: u16, port: u16) -> u64 {
    (u64::from(protocol.0) << 32) | (u64::from(ip) << 16) | u64::from(port)
}

impl Table {
    pub(crate) fn new(pool: Pool, seed: u64) -> Table {
        let n = pool.addrs.len();
        let mut ext_sorted: Vec<u128> =
            pool.addrs.iter().map(|&a| u128::from(to_wire(a))).collect();
        ext_sorted.sort_unstable();
        ext_sorted.dedup();
        let ext_rank = pool
            .addrs
            .iter()
            .map(|&a| {
                let w = u128::from(to_wire(a));
                // The pool is bounded far below 2^16 addresses (pool indexes are u16).
                u16::try_from(ext_sorted.partition_point(|&x| x < w)).unwrap_or(u16::MAX)
            })
            .collect();
        Table {
            pool,
            bindings: Slab::new(),
            binding_by_key: HashTable::new(),
            binding_by_ext: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            whole: vec![None; n],
            on_addr: vec![0; n],
            used: HashMap::new(),
            entries: Slab::new(),
            peer_by_flow: HashMap::new(),
            expiry: BTreeSet::new(),
            order: BTreeMap::new(),
            ext_rank,
            ext_sorted,
            // splitmix64 needs any non-zero-ish start; mix the seed once.
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            holds: Holds {
                whole: vec![None; n],
                on_addr: vec![0; n],
                ..Holds::default()
            },
        }
    }

    /// How long freed endpoints are held from now on.
    pub(crate) fn set_hold_delay(&mut self, delay: std::time::Duration) {
        self.holds.delay = delay;
    }

    /// Ends the holds due by `now` (RFC 6887 section 15's interval is
    /// over: the endpoint is anyone's again).
    pub(crate) fn prune_holds(&mut self, now: Timestamp) {
        self.holds.now = self.holds.now.max(now);
        while let Some(&(until, k)) = self.holds.order.first() {
            if until > self.holds.now {
                break;
            }
            self.holds.order.pop_first();
            self.drop_hold(k, Some(until));
        }
    }

    /// Removes the hold `k` (as in [`Holds::order`]); with `until`, only
    /// if it still ends then (a later hold replaced it otherwise).
    fn drop_hold(&mut self, k: u64, until: Option<Timestamp>) {
        let h = &mut self.holds;
        let due = |x: &Hold| until.is_none_or(|u| x.until == u);
        if k & WHOLE != 0 {
            let slot = h.whole.get_mut((k & 0xffff) as usize);
            if let Some(slot) = slot {
                if slot.as_ref().is_some_and(due) {
                    let x = slot.take();
                    if until.is_none() {
                        if let Some(x) = x {
                            h.order.remove(&(x.until, k));
                        }
                    }
                }
            }
        } else if h.ports.get(&k).is_some_and(due) {
            if let Some(x) = h.ports.remove(&k) {
                if until.is_none() {
                    h.order.remove(&(x.until, k));
                }
                let ip = ((k >> 16) & 0xffff) as usize;
                if let Some(n) = h.on_addr.get_mut(ip) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    /// Holds `ip`/`port` (port 0: the whole address) for `owner` until
    /// `until`, replacing any hold on it.
    fn put_hold(&mut self, ip: u16, port: u16, hold: Hold) {
        let k = if port == 0 {
            WHOLE | u64::from(ip)
        } else {
            ext_key(hold.owner.protocol, ip, port)
        };
        self.drop_hold(k, None);
        let h = &mut self.holds;
        if port == 0 {
            if let Some(slot) = h.whole.get_mut(usize::from(ip)) {
                *slot = Some(hold);
            }
        } else {
            h.ports.insert(k, hold);
            if let Some(n) = h.on_addr.get_mut(usize::from(ip)) {
                *n += 1;
            }
        }
        h.order.insert((hold.until, k));
    }

    /// Whether a hold keeps `protocol`/`ip`/`port` from `who`: its own,
    /// or one on the whole address.
    fn port_barred(
        &self,
        protocol: Protocol,
        ip: u16,
        port: u16,
        who: Option<(&MappingKey, Nonce)>,
    ) -> bool {
        let h = &self.holds;
        let whole = h.whole.get(usize::from(ip)).copied().flatten();
        whole.is_some_and(|x| x.bars(who))
            || h.ports
                .get(&ext_key(protocol, ip, port))
                .is_some_and(|x| x.bars(who))
    }

    /// Whether a hold keeps the whole address `ip` from `who`: one on the
    /// address, or any port held on it.
    fn whole_barred(&self, ip: u16, who: Option<(&MappingKey, Nonce)>) -> bool {
        let h = &self.holds;
        h.on_addr.get(usize::from(ip)).is_some_and(|&n| n > 0)
            || h.whole
                .get(usize::from(ip))
                .copied()
                .flatten()
                .is_some_and(|x| x.bars(who))
    }

    /// Takes a stored or replicated hold back (a restart, a takeover, a
    /// new configuration): kept if it has not ended and its endpoint is in
    /// the pool and unused (a mapping restored there owns it now).
    pub(crate) fn restore_hold(&mut self, hold: &PortHold) {
        if hold.until <= self.holds.now {
            return;
        }
        let Some(ip) = self.pool_index(crate::prefix::canonical(hold.external.ip())) else {
            return;
        };
        let port = hold.external.port();
        let free = if port == 0 {
            self.on_addr[usize::from(ip)] == 0
        } else {
            self.port_free(hold.owner.protocol, ip, port)
        };
        if free {
            let x = Hold {
                until: hold.until,
                owner: hold.owner,
                nonce: hold.nonce,
            };
            self.put_hold(ip, port, x);
        }
    }

    /// How many endpoints are held.
    pub(crate) fn hold_count(&self) -> usize {
        self.holds.order.len()
    }

    /// Every hold, in the order they end.
    pub(crate) fn holds(&self) -> Vec<PortHold> {
        let h = &self.holds;
        h.order
            .iter()
            .filter_map(|&(_, k)| {
                let (ip, port, x) = if k & WHOLE != 0 {
                    let ip = (k & 0xffff) as u16;
                    (ip, 0, h.whole.get(usize::from(ip)).copied().flatten()?)
                } else {
                    ((k >> 16) as u16, k as u16, *h.ports.get(&k)?)
                };
                Some(PortHold {
                    owner: x.owner,
                    nonce: x.nonce,
                    external: SocketAddr::new(self.pool_ip(ip), port),
                    until: x.until,
                })
            })
            .collect()
    }

    /// splitmix64: deterministic under a seed, good enough to spread
    /// allocations (RFC 6056 port randomisation) without a dependency.
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len
    }

    /// MAP entries (every other entry is a PEER): the GET/NEXT order
    /// holds exactly the MAP entries ([`Table::check`]).
    pub(crate) fn map_len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn pool_ip(&self, idx: u16) -> IpAddr {
        self.pool
            .addrs
            .get(usize::from(idx))
            .copied()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn pool_index(&self, ip: IpAddr) -> Option<u16> {
        let i = self.pool.addrs.iter().position(|a| *a == ip)?;
        u16::try_from(i).ok()
    }

    pub(crate) fn binding_of(&self, key: &MappingKey) -> Option<Id> {
        let h = self.hasher.hash_one(key);
        let bindings = &self.bindings;
        self.binding_by_key
            .find(h, |&id| bindings.get(id).is_some_and(|b| b.key == *key))
            .copied()
    }

    fn binding_at_ext(&self, ext: u64) -> Option<Id> {
        let h = self.hasher.hash_one(ext);
        let bindings = &self.bindings;
        self.binding_by_ext
            .find(h, |&id| bindings.get(id).is_some_and(|b| b.ext() == ext))
            .copied()
    }

    pub(crate) fn map_entry(&self, key: &MappingKey) -> Option<Id> {
        self.bindings.get(self.binding_of(key)?)?.map_entry
    }

    pub(crate) fn peer_entry(&self, key: &MappingKey, remote: SocketAddr) -> Option<Id> {
        let b = self.binding_of(key)?;
        self.peer_by_flow.get(&(b, remote)).copied()
    }

    /// The entries whose internal address is `ip`, MAP entries only.
    pub(crate) fn map_entries_of(&self, ip: IpAddr) -> Vec<Id> {
        self.bindings
            .iter()
            .filter(|(_, b)| b.key.internal_ip == ip)
            .filter_map(|(_, b)| b.map_entry)
            .collect()
    }

    pub(crate) fn external_of(&self, binding: Id) -> Option<SocketAddr> {
        let b = self.bindings.get(binding)?;
        Some(SocketAddr::new(self.ext_ip_of(b), b.ext_port))
    }

    /// The external address of `b`: a pool address, or its internal
    /// address for an [`IDENTITY`] binding.
    pub(crate) fn ext_ip_of(&self, b: &Binding) -> IpAddr {
        if b.is_identity() {
            b.key.internal_ip
        } else {
            self.pool_ip(b.ext_ip)
        }
    }

    /// Finds or creates the binding of `key` that translates nothing
    /// (firewall mode, RFC 6887 section 1): its external endpoint is its
    /// internal one. A binding of `key` that does translate stays (it can
    /// only exist if the firewalled prefixes changed under it), and is
    /// refused, as the client would be told an endpoint that is not its
    /// own.
    pub(crate) fn bind_identity(&mut self, key: MappingKey) -> Result<Id, AllocError> {
        if let Some(b) = self.binding_of(&key) {
            return match self.bindings.get(b) {
                Some(x) if x.is_identity() => Ok(b),
                _ => Err(AllocError::CannotProvide),
            };
        }
        let id = self.bindings.insert(Binding {
            key,
            ext_ip: IDENTITY,
            ext_port: key.internal_port,
            map_entry: None,
            peers: 0,
        });
        let Table {
            bindings,
            binding_by_key,
            hasher,
            ..
        } = self;
        let rehash_key = |&id: &Id| bindings.get(id).map_or(0, |b| hasher.hash_one(b.key));
        binding_by_key.insert_unique(hasher.hash_one(key), id, rehash_key);
        Ok(id)
    }

    /// Finds or allocates the binding for `key`, for a request with
    /// `nonce` (which may reclaim an endpoint held for it).
    pub(crate) fn bind(
        &mut self,
        key: MappingKey,
        s: Suggestion,
        nonce: Nonce,
    ) -> Result<Id, AllocError> {
        if let Some(b) = self.binding_of(&key) {
            return Ok(b);
        }
        let who = Some((&key, nonce));
        let (ip, port) = if key.internal_port == 0 {
            (self.alloc_whole(s, who)?, 0)
        } else {
            self.alloc_port(key.protocol, s, who)?
        };
        Ok(self.insert_binding(key, ip, port))
    }

    fn insert_binding(&mut self, key: MappingKey, ip: u16, port: u16) -> Id {
        // Whoever takes an endpoint ends its hold: it was reclaimed by its
        // client, or restored to the mapping that owns it.
        let held = if port == 0 {
            WHOLE | u64::from(ip)
        } else {
            ext_key(key.protocol, ip, port)
        };
        self.drop_hold(held, None);
        let id = self.bindings.insert(Binding {
            key,
            ext_ip: ip,
            ext_port: port,
            map_entry: None,
            peers: 0,
        });
        let Table {
            bindings,
            binding_by_key,
            binding_by_ext,
            hasher,
            ..
        } = self;
        let rehash_key = |&id: &Id| bindings.get(id).map_or(0, |b| hasher.hash_one(b.key));
        binding_by_key.insert_unique(hasher.hash_one(key), id, rehash_key);
        if port == 0 {
            self.whole[usize::from(ip)] = Some(id);
        } else {
            let rehash_ext = |&id: &Id| bindings.get(id).map_or(0, |b| hasher.hash_one(b.ext()));
            binding_by_ext.insert_unique(
                hasher.hash_one(ext_key(key.protocol, ip, port)),
                id,
                rehash_ext,
            );
            *self.used.entry((ip, key.protocol)).or_insert(0) += 1;
        }
        self.on_addr[usize::from(ip)] += 1;
        id
    }

    /// Re-creates the binding of a restored mapping with exactly the
    /// external endpoint it had (a client believes in that endpoint, so
    /// restoring must never re-allocate it). Fails if the address left the
    /// pool or another binding already holds the endpoint.
    pub(crate) fn bind_exact(
        &mut self,
        key: MappingKey,
        external: SocketAddr,
    ) -> Result<Id, AllocError> {
        if let Some(b) = self.binding_of(&key) {
            return if self.external_of(b) == Some(external) {
                Ok(b)
            } else {
                Err(AllocError::CannotProvide)
            };
        }
        let ip = self
            .pool_index(crate::prefix::canonical(external.ip()))
            .ok_or(AllocError::CannotProvide)?;
        let port = external.port();
        let free = if port == 0 {
            self.on_addr[usize::from(ip)] == 0
        } else {
            self.port_free(key.protocol, ip, port)
        };
        if !free {
            return Err(AllocError::CannotProvide);
        }
        Ok(self.insert_binding(key, ip, port))
    }

    /// Whether the external endpoint suggested fits the binding.
    pub(crate) fn binding_matches(&self, binding: Id, s: &Suggestion) -> bool {
        let Some(b) = self.bindings.get(binding) else {
            return false;
        };
        (s.ip.is_none() || s.ip == Some(self.ext_ip_of(b))) && (s.port == 0 || s.port == b.ext_port)
    }

    /// A whole external address, for protocol-0 or port-0 mappings
    /// (RFC 6887 section 11.1: "all protocols" / "all ports").
    fn alloc_whole(
        &mut self,
        s: Suggestion,
        who: Option<(&MappingKey, Nonce)>,
    ) -> Result<u16, AllocError> {
        let free = |t: &Table, i: u16| t.on_addr[usize::from(i)] == 0 && !t.whole_barred(i, who);
        if let Some(ip) = s.ip {
            match self.pool_index(ip) {
                Some(i) if free(self, i) => return Ok(i),
                _ if s.prefer_failure => return Err(AllocError::CannotProvide),
                _ => {}
            }
        }
        let n = self.pool.addrs.len();
        (0..n)
            .filter_map(|i| u16::try_from(i).ok())
            .find(|&i| free(self, i))
            .ok_or(AllocError::Exhausted)
    }

    fn port_free(&self, protocol: Protocol, ip: u16, port: u16) -> bool {
        self.whole[usize::from(ip)].is_none()
            && self.binding_at_ext(ext_key(protocol, ip, port)).is_none()
    }

    fn alloc_port(
        &mut self,
        protocol: Protocol,
        s: Suggestion,
        who: Option<(&MappingKey, Nonce)>,
    ) -> Result<(u16, u16), AllocError> {
        let open = |t: &Table, ip: u16, port: u16| {
            t.port_free(protocol, ip, port) && !t.port_barred(protocol, ip, port, who)
        };
        let n = self.pool.addrs.len();
        if n == 0 {
            return Err(AllocError::Exhausted);
        }
        let suggested_ip = match s.ip {
            Some(ip) => match self.pool_index(ip) {
                Some(i) => Some(i),
                None if s.prefer_failure => return Err(AllocError::CannotProvide),
                None => None,
            },
            None => None,
        };
        let in_range = (self.pool.port_lo..=self.pool.port_hi).contains(&s.port);
        // Try the suggestion first (RFC 6887 section 11.3: honoured when free).
        if s.port != 0 && in_range {
            let candidates: Vec<u16> = match suggested_ip {
                Some(i) => vec![i],
                None => (0..n).filter_map(|i| u16::try_from(i).ok()).collect(),
            };
            if let Some(&ip) = candidates.iter().find(|&&ip| open(self, ip, s.port)) {
                return Ok((ip, s.port));
            }
        }
        // RFC 6887 section 13.2: with PREFER_FAILURE, a suggested port that
        // is taken means failure; a suggested address alone confines the
        // search to that address.
        if s.prefer_failure && s.port != 0 {
            return Err(AllocError::CannotProvide);
        }
        let span = u32::from(self.pool.port_hi - self.pool.port_lo) + 1;
        let start_ip = match suggested_ip {
            Some(i) => usize::from(i),
            None => (self.next_rand() % n as u64) as usize,
        };
        let confined = s.prefer_failure && suggested_ip.is_some();
        let tries = if confined { 1 } else { n };
        for k in 0..tries {
            let Ok(ip) = u16::try_from((start_ip + k) % n) else {
                continue;
            };
            if self.whole[usize::from(ip)].is_some()
                || self.holds.whole[usize::from(ip)].is_some_and(|x| x.bars(who))
            {
                continue;
            }
            if self.used.get(&(ip, protocol)).copied().unwrap_or(0) >= span {
                continue;
            }
            let start = (self.next_rand() % u64::from(span)) as u32;
            for j in 0..span {
                let off = (start + j) % span;
                let Ok(port) = u16::try_from(u32::from(self.pool.port_lo) + off) else {
                    continue;
                };
                if open(self, ip, port) {
                    return Ok((ip, port));
                }
            }
        }
        if confined {
            return Err(AllocError::CannotProvide);
        }
        Err(AllocError::Exhausted)
    }

    /// Frees `binding` if no entry uses it; with `held_for`, the nonce of
    /// the last entry, holds its endpoint for that client and returns the
    /// hold (RFC 6887 section 15).
    fn release_if_unused(&mut self, binding: Id, held_for: Option<Nonce>) -> Option<PortHold> {
        let unused =
            matches!(self.bindings.get(binding), Some(b) if b.map_entry.is_none() && b.peers == 0);
        if !unused {
            return None;
        }
        let b = self.bindings.remove(binding)?;
        let hold = held_for
            .filter(|_| !self.holds.delay.is_zero())
            .map(|nonce| Hold {
                until: self.holds.now + self.holds.delay,
                owner: b.key,
                nonce,
            });
        {
            let hk = self.hasher.hash_one(b.key);
            if let Ok(slot) = self.binding_by_key.find_entry(hk, |&id| id == binding) {
                slot.remove();
            }
            if b.is_identity() {
                // Its endpoint is its host's own: nobody else can get it.
                return None;
            }
            let ip = usize::from(b.ext_ip);
            if b.ext_port == 0 {
                self.whole[ip] = None;
            } else {
                let he = self.hasher.hash_one(b.ext());
                if let Ok(slot) = self.binding_by_ext.find_entry(he, |&id| id == binding) {
                    slot.remove();
                }
                if let Some(u) = self.used.get_mut(&(b.ext_ip, b.key.protocol)) {
                    *u = u.saturating_sub(1);
                }
            }
            self.on_addr[ip] = self.on_addr[ip].saturating_sub(1);
        }
        let hold = hold?;
        self.put_hold(b.ext_ip, b.ext_port, hold);
        Some(PortHold {
            owner: hold.owner,
            nonce: hold.nonce,
            external: SocketAddr::new(self.pool_ip(b.ext_ip), b.ext_port),
            until: hold.until,
        })
    }

    /// Drops a binding that `bind` created but no entry took: nobody held
    /// its endpoint, so nothing is held back.
    pub(crate) fn unbind_if_unused(&mut self, binding: Id) {
        self.release_if_unused(binding, None);
    }

    pub(crate) fn insert(&mut self, entry: Entry) -> Id {
        let binding = entry.binding;
        let remote = entry.remote();
        let expires = entry.expires;
        let id = self.entries.insert(entry);
        let order_key = self.bindings.get(binding).map(|b| self.order_key_of(b));
        if let Some(b) = self.bindings.get_mut(binding) {
            match remote {
                None => {
                    b.map_entry = Some(id);
                    if let Some(k) = order_key {
                        self.order.insert(k, id);
                    }
                }
                Some(r) => {
                    b.peers += 1;
                    self.peer_by_flow.insert((binding, r), id);
                }
            }
        }
        self.expiry.insert((expires, id));
        id
    }

    /// Removes an entry; when that frees its binding and `hold` is set,
    /// the endpoint is held for the entry's client (RFC 6887 section 15)
    /// and the hold returned.
    pub(crate) fn remove(&mut self, id: Id, hold: bool) -> Option<(Entry, Option<PortHold>)> {
        let e = self.entries.remove(id)?;
        self.expiry.remove(&(e.expires, id));
        let order_key = self.bindings.get(e.binding).map(|b| self.order_key_of(b));
        if let Some(b) = self.bindings.get_mut(e.binding) {
            match e.remote() {
                None => {
                    b.map_entry = None;
                    if let Some(k) = order_key {
                        self.order.remove(&k);
                    }
                }
                Some(r) => {
                    b.peers = b.peers.saturating_sub(1);
                    self.peer_by_flow.remove(&(e.binding, r));
                }
            }
        }
        let held = self.release_if_unused(e.binding, hold.then_some(e.nonce));
        Some((e, held))
    }

    pub(crate) fn get(&self, id: Id) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Changes an entry; keeps the expiry index in step.
    pub(crate) fn update(&mut self, id: Id, f: impl FnOnce(&mut Entry)) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        let before = e.expires;
        f(e);
        let after = e.expires;
        if before != after {
            self.expiry.remove(&(before, id));
            self.expiry.insert((after, id));
        }
    }

    fn order_key_of(&self, b: &Binding) -> OrderKey {
        let rank = if b.is_identity() {
            IDENTITY
        } else {
            self.ext_rank
                .get(usize::from(b.ext_ip))
                .copied()
                .unwrap_or(IDENTITY)
        };
        OrderKey::new(
            b.key.internal_ip,
            b.key.protocol,
            b.key.internal_port,
            rank,
            b.ext_port,
        )
    }

    /// The key a NEXT locator stands for, and whether a mapping could
    /// equal it (draft section 4.3 equality). An external address outside
    /// the pool equals no mapping; its key is then the smallest one after
    /// every mapping the locator is greater than, so seeking to it still
    /// lands on "the first mapping greater than the locator".
    pub(crate) fn locator_key(
        &self,
        internal: IpAddr,
        protocol: Protocol,
        internal_port: u16,
        external: IpAddr,
        ext_port: u16,
    ) -> (OrderKey, bool) {
        let w = u128::from(to_wire(external));
        if canonical(external) == canonical(internal)
            && self.pool_index(canonical(external)).is_none()
        {
            // Only an identity binding has an external address outside
            // the pool, and it is the internal one: the locator can name it.
            return (
                OrderKey::new(internal, protocol, internal_port, IDENTITY, ext_port),
                true,
            );
        }
        let pos = self.ext_sorted.partition_point(|&x| x < w);
        let exact = self.ext_sorted.get(pos) == Some(&w);
        let rank = u16::try_from(pos).unwrap_or(u16::MAX);
        let port = if exact { ext_port } else { 0 };
        (
            OrderKey::new(internal, protocol, internal_port, rank, port),
            exact,
        )
    }

    /// MAP entries with keys in `from..=to`, in order.
    pub(crate) fn ordered(
        &self,
        from: OrderKey,
        to: OrderKey,
    ) -> impl Iterator<Item = (OrderKey, Id)> + '_ {
        let range = if from <= to {
            Some(self.order.range(from..=to))
        } else {
            None
        };
        range.into_iter().flatten().map(|(&k, &id)| (k, id))
    }

    /// An entry with its binding.
    pub(crate) fn entry_and_binding(&self, id: Id) -> Option<(&Entry, &Binding)> {
        let e = self.entries.get(id)?;
        Some((e, self.bindings.get(e.binding)?))
    }

    pub(crate) fn next_expiry(&self) -> Option<Timestamp> {
        self.expiry.first().map(|&(t, _)| t)
    }

    /// The first entry that has expired by `now`.
    pub(crate) fn first_expired(&self, now: Timestamp) -> Option<Id> {
        match self.expiry.first() {
            Some(&(t, id)) if t <= now => Some(id),
            _ => None,
        }
    }

    /// The public view of an entry.
    pub(crate) fn record(&self, id: Id, keying: &SubscriberKeying) -> Option<MappingRecord> {
        let e = self.entries.get(id)?;
        let b = self.bindings.get(e.binding)?;
        let extra = e.extra.as_deref();
        Some(MappingRecord {
            kind: match e.remote() {
                None => MappingKind::Map,
                Some(remote) => MappingKind::Peer { remote },
            },
            key: b.key,
            external: SocketAddr::new(self.ext_ip_of(b), b.ext_port),
            nonce: e.nonce,
            expires: e.expires,
            lifetime: e.lifetime,
            checkpoint: e.checkpoint,
            filters: extra.map(|x| x.filters.clone()).unwrap_or_default(),
            description: extra.and_then(|x| x.description.as_deref().map(str::to_owned)),
            subscriber: keying.subscriber_of(b.key.internal_ip),
            third_party: e.third_party,
            followed: e.replicated && !e.checkpoint,
            manager: extra.and_then(|x| x.manager),
        })
    }

    /// Whether every index agrees with the entries and bindings: the
    /// GET/NEXT order holds exactly the MAP entries under their binding's
    /// key, the expiry index exactly the entries' expiries, and no
    /// external endpoint is held by two bindings (RFC 6887 section 11.3:
    /// an external port belongs to one internal endpoint). For tests and
    /// fuzzing; linear in the table.
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut maps = 0usize;
        let mut flows: HashMap<(Id, SocketAddr), Id> = HashMap::new();
        let mut map_of: HashMap<Id, Id> = HashMap::new();
        for (id, e) in self.entries.iter() {
            let b = self
                .bindings
                .get(e.binding)
                .ok_or_else(|| format!("entry {id} names missing binding {}", e.binding))?;
            if !self.expiry.contains(&(e.expires, id)) {
                return Err(format!("entry {id} is not in the expiry index"));
            }
            match e.remote() {
                None => {
                    maps += 1;
                    if b.map_entry != Some(id) {
                        return Err(format!(
                            "binding {} does not name its MAP entry {id}",
                            e.binding
                        ));
                    }
                    if self.order.get(&self.order_key_of(b)) != Some(&id) {
                        return Err(format!("MAP entry {id} is not in the GET/NEXT order"));
                    }
                    map_of.insert(e.binding, id);
                }
                Some(r) => {
                    if flows.insert((e.binding, r), id).is_some() {
                        return Err(format!(
                            "two PEER entries for binding {} and {r}",
                            e.binding
                        ));
                    }
                }
            }
        }
        if self.order.len() != maps {
            return Err(format!(
                "GET/NEXT order has {} keys for {maps} MAP entries",
                self.order.len()
            ));
        }
        if self.expiry.len() != self.entries.len {
            return Err(format!(
                "expiry index has {} for {} entries",
                self.expiry.len(),
                self.entries.len
            ));
        }
        if flows != self.peer_by_flow {
            return Err("the PEER flow index differs from the PEER entries".into());
        }
        let mut peers_of: HashMap<Id, usize> = HashMap::new();
        for (b, _) in flows.keys() {
            *peers_of.entry(*b).or_default() += 1;
        }
        let mut held: HashMap<(u16, u16), Vec<(Protocol, Id)>> = HashMap::new();
        let mut on_addr = vec![0u32; self.on_addr.len()];
        let mut identities = 0usize;
        for (id, b) in self.bindings.iter() {
            if b.map_entry != map_of.get(&id).copied() {
                return Err(format!(
                    "binding {id} names a MAP entry that is not its own"
                ));
            }
            let peers = peers_of.get(&id).copied().unwrap_or(0);
            if b.peers as usize != peers {
                return Err(format!(
                    "binding {id} counts {} PEERs, has {peers}",
                    b.peers
                ));
            }
            if b.map_entry.is_none() && peers == 0 {
                return Err(format!("binding {id} is held by nothing"));
            }
            if b.is_identity() {
                if b.ext_port != b.key.internal_port {
                    return Err(format!("identity binding {id} moved its port"));
                }
                if self.binding_of(&b.key) != Some(id) {
                    return Err(format!("binding {id} is not found by its internal key"));
                }
                identities += 1;
                continue;
            }
            let here = held.entry((b.ext_ip, b.ext_port)).or_default();
            if here.iter().any(|(p, _)| {
                *p == b.key.protocol || *p == Protocol::ALL || b.key.protocol == Protocol::ALL
            }) {
                return Err(format!(
                    "external {}:{} held twice",
                    self.pool_ip(b.ext_ip),
                    b.ext_port
                ));
            }
            here.push((b.key.protocol, id));
            if self.binding_of(&b.key) != Some(id) {
                return Err(format!("binding {id} is not found by its internal key"));
            }
            let n = on_addr
                .get_mut(usize::from(b.ext_ip))
                .ok_or_else(|| format!("binding {id} is on no pool address"))?;
            *n += 1;
            if b.ext_port == 0 {
                if self.whole[usize::from(b.ext_ip)] != Some(id) {
                    return Err(format!("whole-address binding {id} is not recorded"));
                }
            } else if self.binding_at_ext(b.ext()) != Some(id) {
                return Err(format!(
                    "binding {id} is not found by its external endpoint"
                ));
            }
        }
        for (ip, whole) in self.whole.iter().enumerate() {
            let Some(id) = whole else { continue };
            let live = self
                .bindings
                .get(*id)
                .is_some_and(|b| b.ext_port == 0 && usize::from(b.ext_ip) == ip);
            if !live {
                return Err(format!("address {ip} is held whole by no such binding"));
            }
            if on_addr[ip] != 1 {
                return Err(format!(
                    "an address held whole has {} bindings",
                    on_addr[ip]
                ));
            }
        }
        let whole = self.whole.iter().flatten().count();
        if self.binding_by_key.len() != self.bindings.len
            || self.binding_by_ext.len() + whole + identities != self.bindings.len
        {
            return Err("the binding indices hold entries of no binding".into());
        }
        let mut used: HashMap<(u16, Protocol), u32> = HashMap::new();
        for (_, b) in self
            .bindings
            .iter()
            .filter(|(_, b)| b.ext_port != 0 && !b.is_identity())
        {
            *used.entry((b.ext_ip, b.key.protocol)).or_default() += 1;
        }
        let kept: HashMap<(u16, Protocol), u32> = self
            .used
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (*k, *n))
            .collect();
        if used != kept {
            return Err("ports in use per address and protocol are miscounted".into());
        }
        if on_addr != self.on_addr {
            return Err("per-address binding counts are off".into());
        }
        self.check_holds()
    }

    /// Holds (RFC 6887 section 15) are indexed once each and never on an
    /// endpoint a binding holds: taking an endpoint ends its hold.
    fn check_holds(&self) -> Result<(), String> {
        let h = &self.holds;
        let wholes = h.whole.iter().flatten().count();
        if h.order.len() != h.ports.len() + wholes {
            return Err("the hold index and the holds disagree".into());
        }
        let mut on_addr = vec![0u32; h.on_addr.len()];
        for (k, x) in &h.ports {
            let ip = ((k >> 16) & 0xffff) as u16;
            if !h.order.contains(&(x.until, *k)) {
                return Err(format!("port hold {k:#x} is not in the hold index"));
            }
            if self.binding_at_ext(*k).is_some() {
                return Err(format!("port hold {k:#x} is on an endpoint in use"));
            }
            if let Some(n) = on_addr.get_mut(usize::from(ip)) {
                *n += 1;
            }
        }
        for (ip, x) in h.whole.iter().enumerate() {
            let Some(x) = x else { continue };
            if !h.order.contains(&(x.until, WHOLE | ip as u64)) {
                return Err(format!("the hold on address {ip} is not in the hold index"));
            }
            if self.whole[ip].is_some() {
                return Err(format!("address {ip} is held back and held whole"));
            }
        }
        if on_addr != h.on_addr {
            return Err("per-address hold counts are off".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with_one_map() -> (Table, Id) {
        let mut t = Table::new(
            Pool {
                addrs: vec![IpAddr::from([192, 0, 2, 1])],
                port_lo: 2000,
                port_hi: 2003,
            },
            7,
        );
        let key = MappingKey {
            internal_ip: IpAddr::from([10, 0, 0, 1]),
            protocol: Protocol::TCP,
            internal_port: 80,
        };
        let s = Suggestion {
            ip: None,
            port: 0,
            prefer_failure: false,
        };
        let binding = t.bind(key, s, [1; 12]).unwrap();
        let id = t.insert(Entry {
            binding,
            lifetime: 60,
            expires: Timestamp(60_000),
            nonce: [1; 12],
            checkpoint: false,
            replicated: false,
            third_party: false,
            extra: None,
        });
        (t, id)
    }

    #[test]
    fn draft_s4_3_a_table_whose_get_order_lost_a_mapping_fails_its_check() {
        let (mut t, id) = table_with_one_map();
        assert_eq!(t.check(), Ok(()));
        t.order.clear();
        let e = t.check().unwrap_err();
        assert!(
            e.contains(&format!("MAP entry {id} is not in the GET/NEXT order")),
            "{e}"
        );
    }

    #[test]
    fn rfc6887_s11_3_an_external_port_held_twice_fails_the_check() {
        let (mut t, _) = table_with_one_map();
        let ext = t.bindings.iter().next().map(|(_, b)| b.ext_port).unwrap();
        let key = MappingKey {
            internal_ip: IpAddr::from([10, 0, 0, 2]),
            protocol: Protocol::TCP,
            internal_port: 80,
        };
        // Forced past the allocator onto the port the first binding holds.
        let b = t.insert_binding(key, 0, ext);
        t.insert(Entry {
            binding: b,
            lifetime: 60,
            expires: Timestamp(60_000),
            nonce: [2; 12],
            checkpoint: false,
            replicated: false,
            third_party: false,
            extra: None,
        });
        let e = t.check().unwrap_err();
        assert!(
            e.contains("held twice") || e.contains("not found by its external"),
            "{e}"
        );
    }

    #[test]
    fn the_expiry_index_must_follow_the_entries() {
        let (mut t, _) = table_with_one_map();
        t.expiry.clear();
        assert!(t.check().unwrap_err().contains("expiry index"));
    }
}
