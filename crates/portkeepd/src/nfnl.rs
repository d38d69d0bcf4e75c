//! nf_tables set elements and conntrack deletes over netfilter netlink
//! (`NETLINK_NETFILTER`): the few messages the nftables dataplane sends
//! on its hot path, their encoding, and the decoding of the kernel's acks
//! and of conntrack dumps.
//!
//! Everything here is bytes in, bytes out: no text is produced for the
//! kernel and none is read back. The layouts follow the kernel's uapi
//! headers (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
//! `linux/netfilter/nf_tables.h`, `linux/netfilter/nfnetlink_conntrack.h`),
//! checked against what `nft --debug=netlink,mnl` 1.0.6 sends for the same
//! statements (see the tests in `crates/portkeepd/tests/nft_netlink.rs`).
//!
//! The socket is `netlink-sys`'s (MIT); its options are set with rustix.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

/// `NFNL_SUBSYS_CTNETLINK`.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `NFNL_SUBSYS_NFTABLES`.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` (= `NLMSG_MIN_TYPE`).
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
/// `NFNL_MSG_BATCH_END`.
const NFNL_MSG_BATCH_END: u16 = 17;
/// `NFT_MSG_NEWSETELEM`.
const NFT_MSG_NEWSETELEM: u16 = 12;
/// `NFT_MSG_DELSETELEM`.
const NFT_MSG_DELSETELEM: u16 = 14;
/// `IPCTNL_MSG_CT_GET`.
const IPCTNL_MSG_CT_GET: u16 = 1;
/// `IPCTNL_MSG_CT_DELETE`.
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `NLA_TYPE_MASK`: the type without `NLA_F_NESTED` and
/// `NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;

/// `NFPROTO_INET`: the family of an `inet` table.
const NFPROTO_INET: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;

// enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto, ctattr_filter
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
// CTA_FILTER_F_* (nfnetlink_conntrack.h)
const CTA_FILTER_F_IP_SRC: u32 = 1 << 0;
const CTA_FILTER_F_IP_DST: u32 = 1 << 1;
const CTA_FILTER_F_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_PROTO_SRC_PORT: u32 = 1 << 4;
const CTA_FILTER_F_PROTO_DST_PORT: u32 = 1 << 5;

/// Set elements to add or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `NFT_MSG_NEWSETELEM` with `NLM_F_CREATE` (no `NLM_F_EXCL`): like
    /// `nft add element`, adding an identical element again succeeds.
    Add,
    /// `NFT_MSG_DELSETELEM`: an absent element fails with `ENOENT`.
    Del,
}

/// One set element as the kernel stores it: concatenated fields each in a
/// 32-bit register (nftables `netlink_gen_concat_data`: every field is
/// padded to a multiple of 4 bytes), values in network byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElemRef<'a> {
    /// `NFTA_SET_ELEM_KEY`.
    pub key: &'a [u8],
    /// `NFTA_SET_ELEM_KEY_END`: the upper bound of a range in a set with
    /// concatenated intervals (pipapo). nftables sends a concatenated
    /// range as one element with `KEY` and `KEY_END` and no
    /// `NFT_SET_ELEM_INTERVAL_END` flag, unlike single-field interval sets,
    /// which take two elements.
    pub key_end: Option<&'a [u8]>,
    /// `NFTA_SET_ELEM_DATA` (maps only).
    pub data: Option<&'a [u8]>,
}

/// Appends the registers of concatenated key fields.
pub mod reg {
    use std::net::IpAddr;

    /// An 8-bit field (`inet_proto`), in a register of its own.
    pub fn proto(out: &mut Vec<u8>, p: u8) {
        out.extend_from_slice(&[p, 0, 0, 0]);
    }
    /// An `ipv4_addr` or `ipv6_addr`.
    pub fn addr(out: &mut Vec<u8>, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }
    /// An `inet_service` (16 bits, big-endian), padded to its register.
    pub fn port(out: &mut Vec<u8>, p: u16) {
        let b = p.to_be_bytes();
        out.extend_from_slice(&[b[0], b[1], 0, 0]);
    }
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    if let Some(s) = buf.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_ne_bytes());
    }
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(s) = buf.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_ne_bytes());
    }
}

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Starts a netlink message with its `nfgenmsg`; returns where it starts,
/// for [`msg_end`].
fn msg_start(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family, version (NFNETLINK_V0), res_id (big-endian).
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    at
}

fn msg_end(buf: &mut [u8], at: usize) -> Result<(), TooLong> {
    let len = u32::try_from(buf.len().saturating_sub(at)).map_err(|_| TooLong)?;
    put_u32(buf, at, len);
    Ok(())
}

/// A netlink attribute (or message) too long for its length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("netlink attribute too long for its 16-bit length")]
pub struct TooLong;

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) -> Result<(), TooLong> {
    let len = u16::try_from(payload.len().saturating_add(4)).map_err(|_| TooLong)?;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad4(buf);
    Ok(())
}

fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) -> Result<(), TooLong> {
    let len = u16::try_from(buf.len().saturating_sub(at)).map_err(|_| TooLong)?;
    put_u16(buf, at, len);
    Ok(())
}

fn strz(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// `NFNL_MSG_BATCH_BEGIN` for nf_tables: what follows up to
/// [`batch_end`] is one transaction (`nfnetlink_rcv_batch`).
pub fn batch_begin(buf: &mut Vec<u8>, seq: u32) {
    let at = msg_start(
        buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    // 20 bytes: fits.
    let _ = msg_end(buf, at);
}

/// `NFNL_MSG_BATCH_END`: commits the batch if none of its messages failed.
pub fn batch_end(buf: &mut Vec<u8>, seq: u32) {
    let at = msg_start(
        buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    // 20 bytes: fits.
    let _ = msg_end(buf, at);
}

/// One element added to or deleted from `set` of `table inet TABLE`, with
/// `NLM_F_ACK`, so that the kernel answers this message on its own.
pub fn setelem(
    buf: &mut Vec<u8>,
    op: Op,
    seq: u32,
    table: &str,
    set: &str,
    e: ElemRef<'_>,
) -> Result<(), TooLong> {
    setelems(buf, op, seq, table, set, &[e])
}

/// Elements added to or deleted from one set in one message, with
/// `NLM_F_ACK`: the kernel answers the message as a whole (an error names
/// the message, not the element), and stops at the first element it
/// refuses (`nf_tables_newsetelem`). Keep the message under 64 KiB: the
/// list's length is a 16-bit attribute length: a longer one is
/// [`TooLong`], and leaves `buf` as it was.
pub fn setelems(
    buf: &mut Vec<u8>,
    op: Op,
    seq: u32,
    table: &str,
    set: &str,
    elems: &[ElemRef<'_>],
) -> Result<(), TooLong> {
    let start = buf.len();
    let r = setelems_in(buf, op, seq, table, set, elems);
    if r.is_err() {
        buf.truncate(start);
    }
    r
}

fn setelems_in(
    buf: &mut Vec<u8>,
    op: Op,
    seq: u32,
    table: &str,
    set: &str,
    elems: &[ElemRef<'_>],
) -> Result<(), TooLong> {
    let (ty, flags) = match op {
        Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
        Op::Del => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
    };
    let at = msg_start(
        buf,
        (NFNL_SUBSYS_NFTABLES << 8) | ty,
        flags,
        seq,
        NFPROTO_INET,
        0,
    );
    attr(buf, NFTA_SET_ELEM_LIST_TABLE, &strz(table))?;
    attr(buf, NFTA_SET_ELEM_LIST_SET, &strz(set))?;
    let elements = nest_start(buf, NFTA_SET_ELEM_LIST_ELEMENTS);
    for e in elems {
        let elem = nest_start(buf, NFTA_LIST_ELEM);
        let key = nest_start(buf, NFTA_SET_ELEM_KEY);
        attr(buf, NFTA_DATA_VALUE, e.key)?;
        nest_end(buf, key)?;
        if let Some(end) = e.key_end {
            let n = nest_start(buf, NFTA_SET_ELEM_KEY_END);
            attr(buf, NFTA_DATA_VALUE, end)?;
            nest_end(buf, n)?;
        }
        if let Some(data) = e.data {
            let n = nest_start(buf, NFTA_SET_ELEM_DATA);
            attr(buf, NFTA_DATA_VALUE, data)?;
            nest_end(buf, n)?;
        }
        nest_end(buf, elem)?;
    }
    nest_end(buf, elements)?;
    msg_end(buf, at)
}

/// Which part of a conntrack entry a [`CtMatch`] matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// The original direction (`CTA_TUPLE_ORIG`).
    Orig,
    /// The reply direction (`CTA_TUPLE_REPLY`).
    Reply,
}

/// Conntrack entries to delete: those whose tuple in direction `dir`
/// has these fields (`None`: any). With every field given this is one
/// entry, deleted by lookup; otherwise, for IPv4, the kernel deletes
/// every match in one pass (`CTA_FILTER` on `IPCTNL_MSG_CT_DELETE`, Linux
/// 6.11 and later; older kernels answer `EOPNOTSUPP` or `EINVAL`), and
/// for IPv6 the matches are found in a dump ([`CtMatch::kernel_filters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtMatch {
    /// Which tuple the fields are of.
    pub dir: Dir,
    /// IPv6 entries (else IPv4).
    pub v6: bool,
    /// Layer-4 protocol (`None`: any).
    pub proto: Option<u8>,
    /// Source address and port (the port only with a protocol that has
    /// ports).
    pub src: Option<IpAddr>,
    /// Source port.
    pub sport: Option<u16>,
    /// Destination address.
    pub dst: Option<IpAddr>,
    /// Destination port.
    pub dport: Option<u16>,
}

impl CtMatch {
    /// Whether this names one entry: the kernel can look it up.
    pub fn exact(&self) -> bool {
        self.proto.is_some()
            && self.src.is_some()
            && self.dst.is_some()
            && self.sport.is_some()
            && self.dport.is_some()
    }

    /// Whether the kernel can delete these entries itself: one entry by
    /// its tuple, or IPv4 entries by a filter. Not IPv6 entries by a
    /// filter: `ctnetlink_filter_match_tuple` compares IPv6 addresses with
    /// `!ipv6_addr_cmp()`, which is true when they are equal, so a filter
    /// on an IPv6 address skips the entries with that address and takes
    /// every other one (since CTA_FILTER came, Linux 5.8, through 6.18 at
    /// least). Those are matched here instead: see [`CtMatchSet`].
    pub fn kernel_filters(&self) -> bool {
        self.exact() || !self.v6
    }

    /// Whether `e` is one of these entries. A port matches only an entry
    /// whose tuple has ports.
    pub fn matches(&self, e: &CtEntry) -> bool {
        let t = match self.dir {
            Dir::Orig => &e.orig,
            Dir::Reply => &e.reply,
        };
        fn eq<T: PartialEq>(want: Option<T>, have: Option<T>) -> bool {
            want.is_none() || (have.is_some() && want == have)
        }
        self.v6 == (e.family == AF_INET6)
            && eq(self.proto, t.proto)
            && eq(self.src, t.src)
            && eq(self.sport, t.sport)
            && eq(self.dst, t.dst)
            && eq(self.dport, t.dport)
    }

    /// Which fields are given.
    fn shape(&self) -> Shape {
        Shape {
            dir: self.dir,
            proto: self.proto.is_some(),
            src: self.src.is_some(),
            sport: self.sport.is_some(),
            dst: self.dst.is_some(),
            dport: self.dport.is_some(),
        }
    }
}

/// The fields a [`CtMatch`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    dir: Dir,
    proto: bool,
    src: bool,
    sport: bool,
    dst: bool,
    dport: bool,
}

impl Shape {
    /// The match of this shape that `e` would be, if it has every field.
    fn of(&self, e: &CtEntry) -> Option<CtMatch> {
        let t = match self.dir {
            Dir::Orig => &e.orig,
            Dir::Reply => &e.reply,
        };
        fn pick<T>(on: bool, v: Option<T>) -> Option<Option<T>> {
            if on {
                v.map(Some)
            } else {
                Some(None)
            }
        }
        Some(CtMatch {
            dir: self.dir,
            v6: e.family == AF_INET6,
            proto: pick(self.proto, t.proto)?,
            src: pick(self.src, t.src)?,
            sport: pick(self.sport, t.sport)?,
            dst: pick(self.dst, t.dst)?,
            dport: pick(self.dport, t.dport)?,
        })
    }
}

/// Many [`CtMatch`]es, to test entries of a dump against: a lookup per
/// distinct shape (which fields are given), not a comparison per match.
#[derive(Debug, Default)]
pub struct CtMatchSet {
    shapes: Vec<Shape>,
    set: std::collections::HashSet<CtMatch>,
}

impl CtMatchSet {
    /// The set of these matches.
    pub fn new<'a>(matches: impl IntoIterator<Item = &'a CtMatch>) -> CtMatchSet {
        let mut s = CtMatchSet::default();
        for m in matches {
            let shape = m.shape();
            if !s.shapes.contains(&shape) {
                s.shapes.push(shape);
            }
            s.set.insert(*m);
        }
        s
    }

    /// Whether there is no match.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Whether some match of the set matches `e` (as
    /// [`CtMatch::matches`]).
    pub fn matches(&self, e: &CtEntry) -> bool {
        self.shapes
            .iter()
            .any(|s| s.of(e).is_some_and(|m| self.set.contains(&m)))
    }
}

/// One `IPCTNL_MSG_CT_DELETE` for `m`, with `NLM_F_ACK`; on error `buf`
/// is left as it was.
pub fn ct_delete(buf: &mut Vec<u8>, seq: u32, m: &CtMatch) -> Result<(), TooLong> {
    let start = buf.len();
    let r = ct_delete_in(buf, seq, m);
    if r.is_err() {
        buf.truncate(start);
    }
    r
}

fn ct_delete_in(buf: &mut Vec<u8>, seq: u32, m: &CtMatch) -> Result<(), TooLong> {
    let family = if m.v6 { AF_INET6 } else { AF_INET };
    let at = msg_start(
        buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        0,
    );
    let tuple_ty = match m.dir {
        Dir::Orig => CTA_TUPLE_ORIG,
        Dir::Reply => CTA_TUPLE_REPLY,
    };
    let mut flags = 0u32;
    let tuple = nest_start(buf, tuple_ty);
    if m.src.is_some() || m.dst.is_some() {
        let ip = nest_start(buf, CTA_TUPLE_IP);
        let (s, d) = if m.v6 {
            (CTA_IP_V6_SRC, CTA_IP_V6_DST)
        } else {
            (CTA_IP_V4_SRC, CTA_IP_V4_DST)
        };
        for (ty, a, f) in [
            (s, m.src, CTA_FILTER_F_IP_SRC),
            (d, m.dst, CTA_FILTER_F_IP_DST),
        ] {
            if let Some(a) = a {
                let mut v = Vec::with_capacity(16);
                reg::addr(&mut v, a);
                attr(buf, ty, &v)?;
                flags |= f;
            }
        }
        nest_end(buf, ip)?;
    }
    if let Some(p) = m.proto {
        let proto = nest_start(buf, CTA_TUPLE_PROTO);
        attr(buf, CTA_PROTO_NUM, &[p])?;
        flags |= CTA_FILTER_F_PROTO_NUM;
        if let Some(port) = m.sport {
            attr(buf, CTA_PROTO_SRC_PORT, &port.to_be_bytes())?;
            flags |= CTA_FILTER_F_PROTO_SRC_PORT;
        }
        if let Some(port) = m.dport {
            attr(buf, CTA_PROTO_DST_PORT, &port.to_be_bytes())?;
            flags |= CTA_FILTER_F_PROTO_DST_PORT;
        }
        nest_end(buf, proto)?;
    }
    nest_end(buf, tuple)?;
    if !m.exact() {
        // ctnetlink_alloc_filter: which fields of which tuple must match.
        let filter = nest_start(buf, CTA_FILTER);
        let (orig, reply) = match m.dir {
            Dir::Orig => (flags, 0),
            Dir::Reply => (0, flags),
        };
        attr(buf, CTA_FILTER_ORIG_FLAGS, &orig.to_ne_bytes())?;
        attr(buf, CTA_FILTER_REPLY_FLAGS, &reply.to_ne_bytes())?;
        nest_end(buf, filter)?;
    }
    msg_end(buf, at)
}

/// One `IPCTNL_MSG_CT_GET` dump request for the conntrack entries of one
/// family (`ctnetlink_start`: a family in the header is a filter on it).
pub fn ct_dump(buf: &mut Vec<u8>, seq: u32, v6: bool) {
    let family = if v6 { AF_INET6 } else { AF_INET };
    let at = msg_start(
        buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        0,
    );
    // 20 bytes: fits.
    let _ = msg_end(buf, at);
}

/// The fields of a conntrack tuple that [`CtMatch`] compares; `None`
/// where the kernel's dump had no such attribute (no ports for ICMP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtTuple {
    /// `CTA_PROTO_NUM`.
    pub proto: Option<u8>,
    /// `CTA_IP_V4_SRC` or `CTA_IP_V6_SRC`.
    pub src: Option<IpAddr>,
    /// `CTA_PROTO_SRC_PORT`.
    pub sport: Option<u16>,
    /// `CTA_IP_V4_DST` or `CTA_IP_V6_DST`.
    pub dst: Option<IpAddr>,
    /// `CTA_PROTO_DST_PORT`.
    pub dport: Option<u16>,
}

/// One conntrack entry of a dump: what [`CtMatch::matches`] reads, and
/// what [`ct_delete_entry`] needs to delete exactly this entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// The `nfgen_family` of the entry (`AF_INET` or `AF_INET6`).
    pub family: u8,
    /// The original tuple.
    pub orig: CtTuple,
    /// The reply tuple.
    pub reply: CtTuple,
    /// The payload of `CTA_TUPLE_ORIG` as the kernel sent it, sent back
    /// as it is (every protocol's fields, and a directional zone).
    orig_attrs: Vec<u8>,
    /// `CTA_ZONE` (big-endian), if the entry is in a zone.
    zone: Option<[u8; 2]>,
    /// `CTA_ID` (big-endian): a delete of an entry with another id, one
    /// that took the tuple since the dump, fails with `ENOENT`.
    id: Option<[u8; 4]>,
}

/// The attributes in `b`, as (type without flags, payload); `None` if an
/// attribute's length does not fit. Fewer than 4 bytes left over end the
/// list (`nla_for_each_attr`).
fn attrs(b: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while b.len().saturating_sub(at) >= 4 {
        let len = usize::from(read_u16(b, at)?);
        let ty = read_u16(b, at + 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let payload = b.get(at + 4..at.checked_add(len)?)?;
        out.push((ty, payload));
        at = at.checked_add((len + 3) & !3)?;
    }
    Some(out)
}

fn addr_of(ty: u16, p: &[u8]) -> Option<IpAddr> {
    match ty {
        CTA_IP_V4_SRC | CTA_IP_V4_DST => {
            let a: [u8; 4] = p.try_into().ok()?;
            Some(IpAddr::from(a))
        }
        CTA_IP_V6_SRC | CTA_IP_V6_DST => {
            let a: [u8; 16] = p.try_into().ok()?;
            Some(IpAddr::from(a))
        }
        _ => None,
    }
}

fn port_of(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(p.try_into().ok()?))
}

/// A `CTA_TUPLE_*` payload; `None` if malformed.
fn parse_tuple(b: &[u8]) -> Option<CtTuple> {
    let mut t = CtTuple::default();
    for (ty, p) in attrs(b)? {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, p) in attrs(p)? {
                    match ty {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => t.src = addr_of(ty, p),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => t.dst = addr_of(ty, p),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, p) in attrs(p)? {
                    match ty {
                        CTA_PROTO_NUM => t.proto = p.first().copied().filter(|_| p.len() == 1),
                        CTA_PROTO_SRC_PORT => t.sport = port_of(p),
                        CTA_PROTO_DST_PORT => t.dport = port_of(p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(t)
}

/// One `IPCTNL_MSG_CT_NEW`/`_GET` message's payload (after `nlmsghdr`):
/// its entry, or `None` if it lacks a tuple or is malformed.
fn parse_entry(b: &[u8]) -> Option<CtEntry> {
    let family = *b.first()?;
    let mut orig = None;
    let mut reply = None;
    let mut orig_attrs = None;
    let mut zone = None;
    let mut id = None;
    for (ty, p) in attrs(b.get(4..)?)? {
        match ty {
            CTA_TUPLE_ORIG => {
                orig = Some(parse_tuple(p)?);
                orig_attrs = Some(p.to_vec());
            }
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(p)?),
            CTA_ZONE => zone = p.try_into().ok(),
            CTA_ID => id = p.try_into().ok(),
            _ => {}
        }
    }
    Some(CtEntry {
        family,
        orig: orig?,
        reply: reply?,
        orig_attrs: orig_attrs?,
        zone,
        id,
    })
}

/// Where a dump stands after one datagram of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpStatus {
    /// More datagrams follow.
    More,
    /// `NLMSG_DONE`: the dump is complete.
    Done,
    /// The kernel ended the dump with this negative errno.
    Failed(i32),
}

/// The entries in one datagram of the dump with sequence number `seq`,
/// each handed to `each`; messages of other sequence numbers (late acks)
/// are skipped. Every length is checked against the datagram; an entry
/// without both tuples is skipped.
pub fn parse_ct_dump(
    datagram: &[u8],
    seq: u32,
    mut each: impl FnMut(CtEntry),
) -> Result<DumpStatus, DecodeError> {
    let mut at = 0usize;
    while at < datagram.len() {
        let bad = DecodeError::Malformed(at);
        let len = read_u32(datagram, at).ok_or(bad.clone())? as usize;
        let ty = read_u16(datagram, at + 4).ok_or(bad.clone())?;
        let got = read_u32(datagram, at + 8).ok_or(bad.clone())?;
        let end = at.checked_add(len).ok_or(bad.clone())?;
        if len < NLMSG_HDRLEN || end > datagram.len() {
            return Err(bad);
        }
        let body = datagram.get(at + NLMSG_HDRLEN..end).ok_or(bad.clone())?;
        if got == seq {
            match ty {
                NLMSG_DONE => return Ok(DumpStatus::Done),
                NLMSG_ERROR => {
                    let e = read_u32(body, 0).ok_or(bad)? as i32;
                    return Ok(if e == 0 {
                        DumpStatus::Done
                    } else {
                        DumpStatus::Failed(e)
                    });
                }
                _ if ty >> 8 == NFNL_SUBSYS_CTNETLINK => {
                    if let Some(e) = parse_entry(body) {
                        each(e);
                    }
                }
                _ => {}
            }
        }
        at = match at.checked_add(len.saturating_add(3) & !3) {
            Some(next) => next,
            None => return Err(bad),
        };
    }
    Ok(DumpStatus::More)
}

/// One `IPCTNL_MSG_CT_DELETE` of exactly the entry `e` of a dump, with
/// `NLM_F_ACK`: by its original tuple as dumped, in its zone, and only
/// while it has the dumped id. On error `buf` is left as it was.
pub fn ct_delete_entry(buf: &mut Vec<u8>, seq: u32, e: &CtEntry) -> Result<(), TooLong> {
    let start = buf.len();
    let r = ct_delete_entry_in(buf, seq, e);
    if r.is_err() {
        buf.truncate(start);
    }
    r
}

fn ct_delete_entry_in(buf: &mut Vec<u8>, seq: u32, e: &CtEntry) -> Result<(), TooLong> {
    let at = msg_start(
        buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        e.family,
        0,
    );
    let tuple = nest_start(buf, CTA_TUPLE_ORIG);
    buf.extend_from_slice(&e.orig_attrs);
    pad4(buf);
    nest_end(buf, tuple)?;
    if let Some(z) = e.zone {
        attr(buf, CTA_ZONE, &z)?;
    }
    if let Some(id) = e.id {
        attr(buf, CTA_ID, &id)?;
    }
    msg_end(buf, at)
}

/// The kernel's answer to one message: `NLMSG_ERROR` with error 0 (an
/// ack) or a negative errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The sequence number of the message answered.
    pub seq: u32,
    /// 0, or a negative errno.
    pub error: i32,
}

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A message header or length that does not fit the datagram.
    #[error("malformed netlink reply at byte {0}")]
    Malformed(usize),
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The acks and errors in one datagram from the kernel, appended to `out`;
/// other messages are skipped. Every length is checked against the
/// datagram (the kernel is trusted to answer, not to be well-formed).
pub fn parse_acks(datagram: &[u8], out: &mut Vec<Ack>) -> Result<(), DecodeError> {
    let mut at = 0usize;
    while at < datagram.len() {
        let bad = DecodeError::Malformed(at);
        let len = read_u32(datagram, at).ok_or(bad.clone())? as usize;
        let ty = read_u16(datagram, at + 4).ok_or(bad.clone())?;
        let seq = read_u32(datagram, at + 8).ok_or(bad.clone())?;
        if len < NLMSG_HDRLEN || at.checked_add(len).is_none_or(|end| end > datagram.len()) {
            return Err(bad);
        }
        if ty == NLMSG_ERROR {
            if len < NLMSG_HDRLEN + 4 {
                return Err(bad);
            }
            let e = read_u32(datagram, at + NLMSG_HDRLEN).ok_or(bad.clone())?;
            out.push(Ack {
                seq,
                error: e as i32,
            });
        }
        // NLMSG_ALIGN: the next message starts on a 4-byte boundary.
        at = match at.checked_add(len.saturating_add(3) & !3) {
            Some(next) => next,
            None => return Err(bad),
        };
    }
    Ok(())
}

/// How long to wait for the kernel's answers before giving up on them,
/// at most (see [`Socket::open_with`]). The kernel handles a batch within
/// the `sendmsg` call that hands it over, so the answers are normally
/// queued before the wait starts.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Room for the acks of one batch: each is a small skb, but the socket is
/// charged its truesize (about 1 KiB). Setting it needs `CAP_NET_ADMIN`,
/// which programming nftables needs anyway.
pub const RCVBUF: usize = 64 << 20;

/// What one queued ack costs the receive buffer, at most (the skb's
/// truesize; about 768 bytes on x86-64 for an ack without payload).
const ACK_TRUESIZE: usize = 1024;

/// Datagrams read per `recvmmsg`: a batch's acks arrive one datagram each.
const RECV_BATCH: usize = 256;
/// Room for one ack: with `NETLINK_CAP_ACK` even an error is 36 bytes.
const RECV_SLOT: usize = 1024;

/// A `NETLINK_NETFILTER` socket.
pub struct Socket {
    sock: netlink_sys::Socket,
    seq: u32,
    bufs: Vec<Vec<u8>>,
    max_acks: usize,
    reply_timeout: Duration,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("sock", &self.sock)
            .field("seq", &self.seq)
            .field("max_acks", &self.max_acks)
            .finish_non_exhaustive()
    }
}

/// What the kernel said about a batch of messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every message was answered; the errors by sequence number (none:
    /// everything applied).
    Answered(Vec<Ack>),
    /// The batch as a whole was refused: an error for its
    /// `NFNL_MSG_BATCH_BEGIN` (e.g. `EPERM`), or a failed commit (an
    /// error for the first message after it, which is then acked too:
    /// see [`Tally`]). Nothing was applied.
    Refused(i32),
}

impl Socket {
    /// A socket bound to this thread's network namespace, that waits
    /// [`REPLY_TIMEOUT`] for answers.
    pub fn open() -> io::Result<Socket> {
        Socket::open_with(REPLY_TIMEOUT)
    }

    /// A socket bound to this thread's network namespace, that waits
    /// `reply_timeout` for answers (at most [`REPLY_TIMEOUT`], at least
    /// 10 ms).
    pub fn open_with(reply_timeout: Duration) -> io::Result<Socket> {
        let reply_timeout = reply_timeout.clamp(Duration::from_millis(10), REPLY_TIMEOUT);
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        // Errors echo only the header of the failed message, not all of it.
        sock.set_cap_ack(true)?;
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, RCVBUF).is_err() {
            rustix::net::sockopt::set_socket_recv_buffer_size(&sock, RCVBUF)?;
        }
        rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Recv,
            Some(reply_timeout),
        )?;
        // Without CAP_NET_ADMIN the buffer stays at net.core.rmem_max, and
        // batches must be smaller for their acks to fit.
        let rcvbuf = rustix::net::sockopt::socket_recv_buffer_size(&sock)?;
        Ok(Socket {
            sock,
            seq: 1,
            bufs: vec![vec![0; RECV_SLOT]; RECV_BATCH],
            max_acks: (rcvbuf / ACK_TRUESIZE).max(16),
            reply_timeout,
        })
    }

    /// How many acked messages one datagram may hold: the kernel queues
    /// every ack of a batch before the first can be read, and acks that
    /// do not fit the receive buffer are lost (`ENOBUFS`).
    pub fn max_acks(&self) -> usize {
        self.max_acks
    }

    /// The next `n` sequence numbers (their first).
    pub fn seqs(&mut self, n: u32) -> u32 {
        let first = self.seq;
        self.seq = self.seq.wrapping_add(n);
        if self.seq < first {
            // Wrapped: start again past 0, which never names a message.
            self.seq = n + 1;
            return 1;
        }
        first
    }

    fn send(&self, msgs: &[u8]) -> io::Result<()> {
        // One datagram is one skb: the whole batch must fit the send buffer.
        let want = msgs.len() + 4096;
        if rustix::net::sockopt::socket_send_buffer_size(&self.sock).unwrap_or(0) < want {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&self.sock, want);
        }
        let n = self.sock.send(msgs, 0)?;
        if n != msgs.len() {
            return Err(io::Error::other(format!(
                "netlink: sent {n} of {} bytes",
                msgs.len()
            )));
        }
        Ok(())
    }

    /// Reads up to [`RECV_BATCH`] datagrams (one `recvmmsg`), appending
    /// their acks: at least one, waiting for it up to the reply timeout,
    /// when `wait`; otherwise only what is queued. Whether any was read.
    fn recv_acks(&mut self, acks: &mut Vec<Ack>, wait: bool) -> io::Result<bool> {
        use nix::errno::Errno;
        use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
        use std::os::fd::AsRawFd as _;
        let lens: Vec<usize> = {
            let mut slices: Vec<[io::IoSliceMut<'_>; 1]> = self
                .bufs
                .iter_mut()
                .map(|b| [io::IoSliceMut::new(&mut b[..])])
                .collect();
            // Not kept in the socket: it holds raw pointers, which are not
            // Send.
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(RECV_BATCH, None);
            match recvmmsg(
                self.sock.as_raw_fd(),
                &mut headers,
                slices.iter_mut(),
                if wait {
                    MsgFlags::MSG_WAITFORONE
                } else {
                    MsgFlags::MSG_DONTWAIT
                },
                None,
            ) {
                Ok(r) => r.map(|m| m.bytes).collect(),
                // Interrupted: the caller asks again.
                Err(Errno::EINTR) if wait => return Ok(true),
                Err(Errno::EAGAIN | Errno::EINTR) if !wait => return Ok(false),
                Err(Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel within {:?}", self.reply_timeout),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        };
        for (buf, n) in self.bufs.iter().zip(lens) {
            let got = buf.get(..n).ok_or_else(|| {
                io::Error::other(format!("netlink: a {n}-byte answer did not fit"))
            })?;
            parse_acks(got, acks).map_err(io::Error::other)?;
        }
        Ok(true)
    }

    /// Sends `msgs` (one datagram) and waits for an answer to each of the
    /// `count` sequence numbers from `first`; an answer to `batch_seq` (the
    /// batch's begin message) ends the wait: the batch was refused whole.
    /// When some answers are errors, whatever else the kernel queued is
    /// read too (without waiting), to tell a failed commit from refused
    /// messages (see [`Tally`]).
    pub fn transact(
        &mut self,
        msgs: &[u8],
        first: u32,
        count: u32,
        batch_seq: Option<u32>,
    ) -> io::Result<Outcome> {
        self.send(msgs)?;
        let mut tally = Tally::new(first, count, batch_seq);
        let mut acks = Vec::new();
        while !tally.done() {
            acks.clear();
            self.recv_acks(&mut acks, true)?;
            for a in &acks {
                tally.add(*a);
            }
        }
        if tally.has_errors() {
            // The kernel answers a batch within the send: what follows a
            // failed commit's error is queued already.
            loop {
                acks.clear();
                if !self.recv_acks(&mut acks, false)? {
                    break;
                }
                for a in &acks {
                    tally.add(*a);
                }
            }
        }
        Ok(tally.outcome())
    }
    /// Dumps the conntrack entries of one family, handing each to `each`
    /// as its datagram comes (the table is not held in memory).
    pub fn ct_dump(&mut self, v6: bool, mut each: impl FnMut(CtEntry)) -> io::Result<()> {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd as _;
        let seq = self.seqs(1);
        let mut req = Vec::with_capacity(20);
        ct_dump(&mut req, seq, v6);
        self.send(&req)?;
        let mut buf = vec![0u8; DUMP_RECV];
        loop {
            // MSG_TRUNC: the datagram's length, also when it did not fit.
            let n = match recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "conntrack dump: no answer from the kernel within {:?}",
                            self.reply_timeout
                        ),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            let got = buf.get(..n).ok_or_else(|| {
                io::Error::other(format!("conntrack dump: a {n}-byte datagram did not fit"))
            })?;
            match parse_ct_dump(got, seq, &mut each).map_err(io::Error::other)? {
                DumpStatus::More => {}
                DumpStatus::Done => return Ok(()),
                DumpStatus::Failed(e) => {
                    return Err(io::Error::other(format!(
                        "conntrack dump: {}",
                        errno_text(e)
                    )))
                }
            }
        }
    }
}

/// Room for one datagram of a dump: the kernel fills at most 32 KiB
/// (`netlink_recvmsg` caps `max_recvmsg_len` there).
const DUMP_RECV: usize = 64 << 10;

/// The answers to one batch, as they come.
///
/// Each message is acked once (0 or its errno) — except when the
/// nf_tables commit itself fails: the kernel then answers with the error
/// for the header of the batch's first message (the one after
/// `NFNL_MSG_BATCH_BEGIN`), and afterwards acks every message with 0, the
/// first included. So answers are counted by distinct sequence number,
/// and an error and a 0 for the same one mean the commit failed: the
/// batch is refused whole, not that message.
#[derive(Debug)]
pub struct Tally {
    first: u32,
    /// Per message: its answer, if any.
    answers: Vec<Option<i32>>,
    answered: usize,
    batch_seq: Option<u32>,
    refused: Option<i32>,
}

impl Tally {
    /// Answers expected for `count` messages from `first`.
    pub fn new(first: u32, count: u32, batch_seq: Option<u32>) -> Tally {
        Tally {
            first,
            answers: vec![None; count as usize],
            answered: 0,
            batch_seq,
            refused: None,
        }
    }

    /// Counts one answer; others than the batch's are ignored.
    pub fn add(&mut self, a: Ack) {
        if Some(a.seq) == self.batch_seq {
            if a.error != 0 {
                self.refused.get_or_insert(a.error);
            }
            return;
        }
        let Some(slot) = self
            .answers
            .get_mut(a.seq.wrapping_sub(self.first) as usize)
        else {
            return;
        };
        match *slot {
            None => {
                *slot = Some(a.error);
                self.answered += 1;
            }
            Some(e) if e != a.error => {
                // An error and an ack for one message: the commit failed.
                let err = if e != 0 { e } else { a.error };
                self.refused.get_or_insert(err);
                *slot = Some(0);
            }
            Some(_) => {}
        }
    }

    /// Whether the wait is over: every message answered, or the batch
    /// refused by its begin message.
    pub fn done(&self) -> bool {
        self.answered == self.answers.len()
            || (self.refused.is_some() && self.answers.iter().all(Option::is_none))
    }

    /// Whether any message has an error so far.
    pub fn has_errors(&self) -> bool {
        self.answers.iter().any(|a| a.is_some_and(|e| e != 0))
    }

    /// What the answers come to.
    pub fn outcome(&self) -> Outcome {
        if let Some(err) = self.refused {
            return Outcome::Refused(err);
        }
        Outcome::Answered(
            self.answers
                .iter()
                .zip(0u32..)
                .filter_map(|(a, k)| match a {
                    Some(e) if *e != 0 => Some(Ack {
                        seq: self.first.wrapping_add(k),
                        error: *e,
                    }),
                    _ => None,
                })
                .collect(),
        )
    }
}

/// An errno from an ack, for messages.
pub fn errno_text(error: i32) -> String {
    // From the kernel: i32::MIN has no negation.
    match error.checked_neg() {
        Some(e) => io::Error::from_raw_os_error(e).to_string(),
        None => format!("error {error}"),
    }
}

/// `ENOENT` as an ack carries it.
pub const ENOENT: i32 = -2;
/// `EINVAL` as an ack carries it.
pub const EINVAL: i32 = -22;
/// `EOPNOTSUPP` as an ack carries it.
pub const EOPNOTSUPP: i32 = -95;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_pad_every_field_to_four_bytes() {
        let mut k = Vec::new();
        reg::proto(&mut k, 6);
        reg::addr(&mut k, "198.51.100.1".parse().unwrap());
        reg::port(&mut k, 30000);
        assert_eq!(k, [6, 0, 0, 0, 198, 51, 100, 1, 0x75, 0x30, 0, 0]);
    }

    #[test]
    fn batch_begin_names_the_nftables_subsystem() {
        let mut b = Vec::new();
        batch_begin(&mut b, 7);
        let mut want = Vec::new();
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&16u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 10]);
        assert_eq!(b, want);
    }

    /// The bytes `nft --debug=mnl add element inet t dnat4_all { 1.2.3.4 :
    /// 5.6.7.8 }` shows, less its `NFTA_SET_ELEM_LIST_SET_ID`, plus
    /// `NLM_F_ACK`.
    #[test]
    fn newsetelem_of_a_plain_map_element() {
        let mut b = Vec::new();
        setelem(
            &mut b,
            Op::Add,
            1,
            "t",
            "dnat4_all",
            ElemRef {
                key: &[1, 2, 3, 4],
                key_end: None,
                data: Some(&[5, 6, 7, 8]),
            },
        )
        .unwrap();
        let mut want: Vec<u8> = Vec::new();
        let n = |v: u16| v.to_ne_bytes();
        want.extend_from_slice(&76u32.to_ne_bytes());
        want.extend_from_slice(&n(0x0a0c));
        want.extend_from_slice(&n(0x405));
        want.extend_from_slice(&1u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[1, 0, 0, 0]);
        want.extend_from_slice(&n(6));
        want.extend_from_slice(&n(1));
        want.extend_from_slice(b"t\0\0\0");
        want.extend_from_slice(&n(14));
        want.extend_from_slice(&n(2));
        want.extend_from_slice(b"dnat4_all\0\0\0");
        for (len, ty) in [(32u16, 0x8003u16), (28, 0x8001), (12, 0x8001), (8, 1)] {
            want.extend_from_slice(&n(len));
            want.extend_from_slice(&n(ty));
        }
        want.extend_from_slice(&[1, 2, 3, 4]);
        for (len, ty) in [(12u16, 0x8002u16), (8, 1)] {
            want.extend_from_slice(&n(len));
            want.extend_from_slice(&n(ty));
        }
        want.extend_from_slice(&[5, 6, 7, 8]);
        assert_eq!(b, want);
    }

    /// `nft --debug=mnl delete element inet t allow4 { 6 . 198.51.100.1 .
    /// 30022 . 192.0.2.7/32 . 5000 }`: a concatenated range is one element
    /// with `KEY` and `KEY_END`, no flags attribute.
    #[test]
    fn delsetelem_of_a_concatenated_range() {
        let key = [
            6, 0, 0, 0, 0xc6, 0x33, 0x64, 0x01, 0x75, 0x46, 0, 0, 0xc0, 0, 2, 7, 0x13, 0x88, 0, 0,
        ];
        let mut b = Vec::new();
        setelem(
            &mut b,
            Op::Del,
            9,
            "t",
            "allow4",
            ElemRef {
                key: &key,
                key_end: Some(&key),
                data: None,
            },
        )
        .unwrap();
        let n = |v: u16| v.to_ne_bytes();
        let mut want: Vec<u8> = Vec::new();
        want.extend_from_slice(&104u32.to_ne_bytes());
        want.extend_from_slice(&n(0x0a0e));
        want.extend_from_slice(&n(0x5));
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[1, 0, 0, 0]);
        want.extend_from_slice(&n(6));
        want.extend_from_slice(&n(1));
        want.extend_from_slice(b"t\0\0\0");
        want.extend_from_slice(&n(11));
        want.extend_from_slice(&n(2));
        want.extend_from_slice(b"allow4\0\0");
        for (len, ty) in [(64u16, 0x8003u16), (60, 0x8001), (28, 0x8001), (24, 1)] {
            want.extend_from_slice(&n(len));
            want.extend_from_slice(&n(ty));
        }
        want.extend_from_slice(&key);
        want.extend_from_slice(&n(28));
        want.extend_from_slice(&n(0x800a));
        want.extend_from_slice(&n(24));
        want.extend_from_slice(&n(1));
        want.extend_from_slice(&key);
        assert_eq!(b, want);
    }

    #[test]
    fn setelems_carries_each_element_in_its_own_list_entry() {
        let e = ElemRef {
            key: &[1, 2, 3, 4],
            key_end: None,
            data: Some(&[5, 6, 7, 8]),
        };
        let mut one = Vec::new();
        setelem(&mut one, Op::Add, 1, "t", "dnat4_all", e).unwrap();
        let mut two = Vec::new();
        setelems(&mut two, Op::Add, 1, "t", "dnat4_all", &[e, e]).unwrap();
        let entry = &one[one.len() - 28..];
        assert_eq!(two.len(), one.len() + 28);
        assert_eq!(&two[..4], &(one.len() as u32 + 28).to_ne_bytes());
        assert_eq!(&two[two.len() - 56..two.len() - 28], entry);
        assert_eq!(&two[two.len() - 28..], entry);
        // NFTA_SET_ELEM_LIST_ELEMENTS, after header, table and set.
        assert_eq!(
            &two[44..48],
            [&60u16.to_ne_bytes()[..], &0x8003u16.to_ne_bytes()].concat()
        );
    }

    #[test]
    fn ct_delete_of_one_flow_is_a_lookup_without_filter() {
        let mut b = Vec::new();
        ct_delete(
            &mut b,
            3,
            &CtMatch {
                dir: Dir::Orig,
                v6: false,
                proto: Some(17),
                src: Some("10.0.0.2".parse().unwrap()),
                sport: Some(5000),
                dst: Some("203.0.113.9".parse().unwrap()),
                dport: Some(3478),
            },
        )
        .unwrap();
        let n = |v: u16| v.to_ne_bytes();
        let mut want: Vec<u8> = Vec::new();
        want.extend_from_slice(&72u32.to_ne_bytes());
        want.extend_from_slice(&n(0x0102));
        want.extend_from_slice(&n(0x5));
        want.extend_from_slice(&3u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 0, 0, 0]);
        want.extend_from_slice(&n(52));
        want.extend_from_slice(&n(0x8001));
        want.extend_from_slice(&n(20));
        want.extend_from_slice(&n(0x8001));
        want.extend_from_slice(&n(8));
        want.extend_from_slice(&n(1));
        want.extend_from_slice(&[10, 0, 0, 2]);
        want.extend_from_slice(&n(8));
        want.extend_from_slice(&n(2));
        want.extend_from_slice(&[203, 0, 113, 9]);
        want.extend_from_slice(&n(28));
        want.extend_from_slice(&n(0x8002));
        want.extend_from_slice(&n(5));
        want.extend_from_slice(&n(1));
        want.extend_from_slice(&[17, 0, 0, 0]);
        want.extend_from_slice(&n(6));
        want.extend_from_slice(&n(2));
        want.extend_from_slice(&[0x13, 0x88, 0, 0]);
        want.extend_from_slice(&n(6));
        want.extend_from_slice(&n(3));
        want.extend_from_slice(&[0x0d, 0x96, 0, 0]);
        assert_eq!(b, want);
    }

    #[test]
    fn ct_delete_of_a_partial_tuple_carries_a_filter() {
        let mut b = Vec::new();
        ct_delete(
            &mut b,
            3,
            &CtMatch {
                dir: Dir::Reply,
                v6: false,
                proto: Some(6),
                src: None,
                sport: None,
                dst: Some("198.51.100.1".parse().unwrap()),
                dport: Some(30022),
            },
        )
        .unwrap();
        // ... CTA_FILTER { ORIG_FLAGS 0, REPLY_FLAGS IP_DST|PROTO_NUM|DST_PORT }
        let tail: Vec<u8> = [
            &20u16.to_ne_bytes()[..],
            &(25u16 | 0x8000).to_ne_bytes(),
            &8u16.to_ne_bytes(),
            &1u16.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &8u16.to_ne_bytes(),
            &2u16.to_ne_bytes(),
            &0x2au32.to_ne_bytes(),
        ]
        .concat();
        assert!(b.ends_with(&tail), "{b:02x?}");
    }

    #[test]
    fn ipv6_partial_matches_are_not_left_to_the_kernel_filter() {
        let m = CtMatch {
            dir: Dir::Orig,
            v6: true,
            proto: Some(6),
            src: None,
            sport: None,
            dst: Some("2001:db8:ffff::1".parse().unwrap()),
            dport: Some(30000),
        };
        assert!(!m.kernel_filters());
        assert!(CtMatch { v6: false, ..m }.kernel_filters());
        let exact = CtMatch {
            src: Some("2001:db8::7".parse().unwrap()),
            sport: Some(41000),
            ..m
        };
        assert!(exact.exact() && exact.kernel_filters());
    }

    #[test]
    fn a_dump_request_names_the_family() {
        let mut b = Vec::new();
        ct_dump(&mut b, 9, true);
        let mut want = Vec::new();
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&0x0101u16.to_ne_bytes());
        want.extend_from_slice(&0x0301u16.to_ne_bytes());
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[10, 0, 0, 0]);
        assert_eq!(b, want);
    }

    /// A tuple as `ctnetlink_dump_tuples` writes it: `CTA_TUPLE_IP`, then
    /// `CTA_TUPLE_PROTO` with the protocol's own attributes.
    fn dumped_tuple(src: &str, dst: &str, proto: u8, l4: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        let ip = nest_start(&mut b, CTA_TUPLE_IP);
        for (ty, a) in [(CTA_IP_V6_SRC, src), (CTA_IP_V6_DST, dst)] {
            let a: std::net::Ipv6Addr = a.parse().unwrap();
            attr(&mut b, ty, &a.octets()).unwrap();
        }
        nest_end(&mut b, ip).unwrap();
        let p = nest_start(&mut b, CTA_TUPLE_PROTO);
        attr(&mut b, CTA_PROTO_NUM, &[proto]).unwrap();
        for (ty, v) in l4 {
            attr(&mut b, *ty, v).unwrap();
        }
        nest_end(&mut b, p).unwrap();
        b
    }

    /// One `IPCTNL_MSG_CT_GET` message of a dump.
    fn dumped_entry(seq: u32, orig: &[u8], reply: &[u8], zone: Option<u16>, id: u32) -> Vec<u8> {
        let mut b = Vec::new();
        let at = msg_start(&mut b, 0x0101, 0x2, seq, AF_INET6, 0);
        for (ty, t) in [(CTA_TUPLE_ORIG, orig), (CTA_TUPLE_REPLY, reply)] {
            let n = nest_start(&mut b, ty);
            b.extend_from_slice(t);
            nest_end(&mut b, n).unwrap();
        }
        // CTA_STATUS, which is not read.
        attr(&mut b, 3, &0x18eu32.to_be_bytes()).unwrap();
        if let Some(z) = zone {
            attr(&mut b, CTA_ZONE, &z.to_be_bytes()).unwrap();
        }
        attr(&mut b, CTA_ID, &id.to_be_bytes()).unwrap();
        msg_end(&mut b, at).unwrap();
        b
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&20u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        b.extend_from_slice(&2u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b
    }

    fn sample_dump() -> (Vec<u8>, Vec<u8>) {
        let (o, r) = ([41000u16, 30000], [8080u16, 41000]);
        let (o, r) = (o.map(u16::to_be_bytes), r.map(u16::to_be_bytes));
        let ports = |p: &[[u8; 2]; 2]| -> [(u16, Vec<u8>); 2] {
            [
                (CTA_PROTO_SRC_PORT, p[0].to_vec()),
                (CTA_PROTO_DST_PORT, p[1].to_vec()),
            ]
        };
        let (o, r) = (ports(&o), ports(&r));
        let o: Vec<(u16, &[u8])> = o.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let r: Vec<(u16, &[u8])> = r.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let orig = dumped_tuple("2001:db8:aaaa::7", "2001:db8:ffff::1", 6, &o);
        let reply = dumped_tuple("2001:db8::2", "2001:db8:aaaa::7", 6, &r);
        let mut d = dumped_entry(7, &orig, &reply, Some(3), 0xdead_beef);
        // ICMPv6 echo: no ports.
        let icmp: Vec<(u16, &[u8])> = vec![(7, &[0, 5][..]), (8, &[128][..]), (9, &[0][..])];
        let o2 = dumped_tuple("2001:db8:aaaa::7", "2001:db8:ffff::1", 58, &icmp);
        let r2 = dumped_tuple("2001:db8:ffff::1", "2001:db8:aaaa::7", 58, &icmp);
        d.extend(dumped_entry(7, &o2, &r2, None, 1));
        (d, orig)
    }

    #[test]
    fn a_dump_is_read_into_entries() {
        let (mut d, orig) = sample_dump();
        let mut got = Vec::new();
        assert_eq!(parse_ct_dump(&d, 7, |e| got.push(e)), Ok(DumpStatus::More));
        assert_eq!(got.len(), 2, "{got:?}");
        let e = &got[0];
        assert_eq!(e.family, AF_INET6);
        assert_eq!(
            e.orig,
            CtTuple {
                proto: Some(6),
                src: Some("2001:db8:aaaa::7".parse().unwrap()),
                sport: Some(41000),
                dst: Some("2001:db8:ffff::1".parse().unwrap()),
                dport: Some(30000),
            }
        );
        assert_eq!(e.reply.src, Some("2001:db8::2".parse().unwrap()));
        assert_eq!(e.reply.sport, Some(8080));
        assert_eq!(e.orig_attrs, orig);
        assert_eq!(e.zone, Some([0, 3]));
        assert_eq!(e.id, Some([0xde, 0xad, 0xbe, 0xef]));
        assert_eq!((got[1].orig.proto, got[1].orig.sport), (Some(58), None));
        // Another dump's messages are not this one's; DONE ends it.
        got.clear();
        d.extend(done(7));
        assert_eq!(parse_ct_dump(&d, 8, |e| got.push(e)), Ok(DumpStatus::More));
        assert!(got.is_empty());
        assert_eq!(parse_ct_dump(&d, 7, |e| got.push(e)), Ok(DumpStatus::Done));
        assert_eq!(got.len(), 2);
        // An error ends it too.
        let mut err = done(7);
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-105i32).to_ne_bytes());
        assert_eq!(parse_ct_dump(&err, 7, |_| {}), Ok(DumpStatus::Failed(-105)));
    }

    #[test]
    fn a_dumped_entry_is_deleted_by_its_own_tuple_zone_and_id() {
        let (d, orig) = sample_dump();
        let mut got = Vec::new();
        parse_ct_dump(&d, 7, |e| got.push(e)).unwrap();
        let mut b = Vec::new();
        ct_delete_entry(&mut b, 4, &got[0]).unwrap();
        let n = |v: u16| v.to_ne_bytes();
        let mut want: Vec<u8> = Vec::new();
        let len = 20 + 4 + orig.len() + 8 + 8;
        want.extend_from_slice(&(len as u32).to_ne_bytes());
        want.extend_from_slice(&n(0x0102));
        want.extend_from_slice(&n(0x5));
        want.extend_from_slice(&4u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[10, 0, 0, 0]);
        want.extend_from_slice(&n(4 + orig.len() as u16));
        want.extend_from_slice(&n(0x8001));
        want.extend_from_slice(&orig);
        want.extend_from_slice(&n(6));
        want.extend_from_slice(&n(CTA_ZONE));
        want.extend_from_slice(&[0, 3, 0, 0]);
        want.extend_from_slice(&n(8));
        want.extend_from_slice(&n(CTA_ID));
        want.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(b, want);
    }

    #[test]
    fn dumped_entries_match_by_the_given_fields_only() {
        let (d, _) = sample_dump();
        let mut got = Vec::new();
        parse_ct_dump(&d, 7, |e| got.push(e)).unwrap();
        let (tcp, icmp) = (&got[0], &got[1]);
        let ext: IpAddr = "2001:db8:ffff::1".parse().unwrap();
        let int: IpAddr = "2001:db8::2".parse().unwrap();
        let inbound = CtMatch {
            dir: Dir::Orig,
            v6: true,
            proto: Some(6),
            src: None,
            sport: None,
            dst: Some(ext),
            dport: Some(30000),
        };
        let from_int = CtMatch {
            dir: Dir::Reply,
            dst: None,
            dport: None,
            src: Some(int),
            sport: Some(8080),
            ..inbound
        };
        let any_proto = CtMatch {
            proto: None,
            dport: None,
            ..inbound
        };
        let cases = [
            (inbound, true, false),
            (from_int, true, false),
            (any_proto, true, true),
            (
                CtMatch {
                    dport: Some(30001),
                    ..inbound
                },
                false,
                false,
            ),
            (
                CtMatch {
                    dst: Some(int),
                    ..inbound
                },
                false,
                false,
            ),
            (
                CtMatch {
                    dir: Dir::Reply,
                    ..inbound
                },
                false,
                false,
            ),
            (
                CtMatch {
                    v6: false,
                    ..any_proto
                },
                false,
                false,
            ),
            // A port never matches an entry without ports.
            (
                CtMatch {
                    proto: Some(58),
                    ..inbound
                },
                false,
                false,
            ),
        ];
        for (m, on_tcp, on_icmp) in cases {
            assert_eq!(m.matches(tcp), on_tcp, "{m:?}");
            assert_eq!(m.matches(icmp), on_icmp, "{m:?}");
            let set = CtMatchSet::new([&m]);
            assert_eq!(set.matches(tcp), on_tcp, "{m:?}");
            assert_eq!(set.matches(icmp), on_icmp, "{m:?}");
        }
        let all: Vec<CtMatch> = cases.iter().map(|c| c.0).collect();
        let set = CtMatchSet::new(&all);
        assert!(set.matches(tcp) && set.matches(icmp));
        let none = CtMatchSet::new(&all[3..5]);
        assert!(!none.matches(tcp) && !none.matches(icmp));
        assert!(CtMatchSet::new(&[]).is_empty());
    }

    /// Whatever the kernel sends, reading it neither panics nor loops.
    #[test]
    fn a_dump_is_read_with_bounds_checks() {
        let (mut d, _) = sample_dump();
        d.extend(done(7));
        for cut in 0..d.len() {
            let _ = parse_ct_dump(&d[..cut], 7, |_| {});
        }
        for at in 0..d.len() {
            for v in [0u8, 1, 3, 4, 5, 15, 16, 17, 0x80, 0xff] {
                let mut bad = d.clone();
                bad[at] = v;
                let _ = parse_ct_dump(&bad, 7, |e| {
                    let mut b = Vec::new();
                    let _ = ct_delete_entry(&mut b, 1, &e);
                });
            }
        }
        let mut huge = d.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_ct_dump(&huge, 7, |_| {}).is_err());
    }

    #[test]
    fn acks_are_read_with_bounds_checks() {
        let mut d = Vec::new();
        for (seq, err) in [(5u32, 0i32), (6, -2)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&2u16.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&err.to_ne_bytes());
            d.extend_from_slice(&[0; 16]);
        }
        let mut out = Vec::new();
        parse_acks(&d, &mut out).unwrap();
        assert_eq!(out, [Ack { seq: 5, error: 0 }, Ack { seq: 6, error: -2 }]);
        // Every truncation and every lying length is an error, never a panic.
        for cut in (1..d.len()).filter(|c| c % 36 != 0) {
            let mut out = Vec::new();
            assert!(parse_acks(&d[..cut], &mut out).is_err(), "cut at {cut}");
        }
        for at in 0..d.len() {
            for v in [0u8, 3, 15, 16, 17, 0xff] {
                let mut bad = d.clone();
                bad[at] = v;
                let mut out = Vec::new();
                let _ = parse_acks(&bad, &mut out);
            }
        }
        let mut out = Vec::new();
        assert!(parse_acks(&d[..20], &mut out).is_err());
        // An error message too short for its error word.
        let mut short = d[..36].to_vec();
        short[..4].copy_from_slice(&16u32.to_ne_bytes());
        let mut out = Vec::new();
        assert!(parse_acks(&short, &mut out).is_err());
        assert!(out.is_empty(), "{out:?}");
        // A length near usize::MAX neither overflows nor panics.
        let mut huge = d.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_acks(&huge, &mut Vec::new()).is_err());
    }

    /// An attribute longer than its 16-bit length can say is an error,
    /// not a truncated length, and leaves nothing half-written.
    #[test]
    fn an_element_too_long_for_its_attribute_fails_cleanly() {
        let key = vec![0u8; 70_000];
        let mut b = vec![1, 2, 3, 4];
        let e = ElemRef {
            key: &key,
            key_end: None,
            data: None,
        };
        assert_eq!(setelem(&mut b, Op::Add, 1, "t", "s", e), Err(TooLong));
        assert_eq!(b, [1, 2, 3, 4]);
        // Many elements, each fine, overflow the list's nest.
        let key = vec![0u8; 1000];
        let e = ElemRef {
            key: &key,
            key_end: None,
            data: None,
        };
        let many = vec![e; 70];
        assert_eq!(setelems(&mut b, Op::Add, 1, "t", "s", &many), Err(TooLong));
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn errno_text_of_any_kernel_value() {
        assert!(
            errno_text(-2).contains("No such file"),
            "{}",
            errno_text(-2)
        );
        let _ = errno_text(i32::MIN);
        let _ = errno_text(i32::MAX);
    }

    fn ack(seq: u32, error: i32) -> Ack {
        Ack { seq, error }
    }

    #[test]
    fn every_message_acked_once_is_answered_with_its_errors() {
        let mut t = Tally::new(11, 3, Some(10));
        for a in [ack(11, 0), ack(12, -17), ack(99, -1)] {
            t.add(a);
        }
        assert!(!t.done());
        t.add(ack(13, 0));
        assert!(t.done());
        assert_eq!(t.outcome(), Outcome::Answered(vec![ack(12, -17)]));
    }

    /// A failed nf_tables commit: the kernel answers the error for the
    /// first message after BATCH_BEGIN, then acks every message with 0.
    /// That is the whole batch refused, not its first message; and the
    /// count is of distinct messages, so no answer is left unread.
    #[test]
    fn a_failed_commit_refuses_the_whole_batch() {
        let mut t = Tally::new(11, 3, Some(10));
        t.add(ack(11, -12));
        t.add(ack(11, 0));
        t.add(ack(12, 0));
        assert!(!t.done(), "one ack still to come");
        t.add(ack(13, 0));
        assert!(t.done());
        assert_eq!(t.outcome(), Outcome::Refused(-12));
        // A batch of one message: its error alone completes the count,
        // the ack read after it (without waiting) shows the commit failed.
        let mut t = Tally::new(11, 1, Some(10));
        t.add(ack(11, -12));
        assert!(t.done() && t.has_errors());
        t.add(ack(11, 0));
        assert_eq!(t.outcome(), Outcome::Refused(-12));
    }

    #[test]
    fn an_error_for_batch_begin_refuses_the_batch_at_once() {
        let mut t = Tally::new(11, 3, Some(10));
        t.add(ack(10, -1));
        assert!(t.done());
        assert_eq!(t.outcome(), Outcome::Refused(-1));
        // An ack for it is no answer.
        let mut t = Tally::new(11, 1, Some(10));
        t.add(ack(10, 0));
        assert!(!t.done());
    }
}
