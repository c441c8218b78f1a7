// Shared by both backends: the event record and the readers of skb/sock/conntrack.
// Offsets (OFF_*) are defines computed from BTF by tracer/probes/loader.py.
#ifndef RST_TRACER_COMMON_H
#define RST_TRACER_COMMON_H

// KIND_*, PROBE_* and DEL_* are -D defines, and struct rst_event is generated: both from
// tracer/record.py, which the decoder unpacks with.
#include "record.h"

// Packet headers as they are on the wire (RFC 791, 8200, 9293): declared here rather than
// taken from the kernel's uapi headers, whose include tree alone doubled the compile time.
struct wire_ipv4 {
    u8 ver_ihl;
    u8 tos;
    u16 tot_len;
    u16 id;
    u16 frag_off;
    u8 ttl;
    u8 protocol;
    u16 check;
    u32 saddr;
    u32 daddr;
};
struct wire_ipv6 {
    u32 ver_tc_flow;
    u16 payload_len;
    u8 nexthdr;
    u8 hop_limit;
    u8 saddr[16];
    u8 daddr[16];
};
struct wire_tcp {
    u16 source;
    u16 dest;
    u32 seq;
    u32 ack_seq;
    u8 doff_res;    // data offset in the high 4 bits
    u8 flags;
    u16 window;
    u16 check;
    u16 urg_ptr;
};

// wire/ABI constants, stable across kernels
#define PROTO_TCP 6
#define FAMILY_INET 2
// include/net/tcp_states.h (stable)
#define TCP_STATE_SYN_SENT 2
#define TCP_STATE_SYN_RECV 3
#define TCP_STATE_CLOSE 7
#define TCP_STATE_LISTEN 10
#define FAMILY_INET6 10

// include/uapi/linux/netfilter/nf_conntrack_common.h (stable ABI)
#define IPS_CONFIRMED (1 << 3)
#define IPS_SRC_NAT (1 << 4)
#define IPS_DST_NAT (1 << 5)
#define IPS_DYING (1 << 9)
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_STATE_TIME_WAIT 6

// Two lanes. `events` carries what can be a root cause (conntrack's verdicts, NAT bindings,
// deletions, netfilter drops, resets of segments no connection owns or of NATed flows, new
// namespaces): never shed, and drained first. `ordinary` carries the ordinary resets and
// drops (closed ports, application aborts, resets received, listen overflows): in a storm
// in a namespace user space stops taking that namespace's one by one (`storming`) and they
// are only counted, per namespace, class and local port, in `shed` — as they are when that
// ring is full — so the totals stay exact whatever is shed. Per namespace: a port scan of
// one container leaves every other namespace's resets explained one by one.
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(ordinary, ORDINARY_RINGBUF_PAGES);
// Root-cause events that found their ring full: read by user space and reported in-band.
BPF_PERCPU_ARRAY(lost_events, u64, 1);
BPF_HASH(storming, u32, u8, STORMING_ENTRIES);
struct shed_key {
    u32 netns;
    u16 klass;      // CLASS_*
    u16 port;       // local port; 0 once the table is full
};
BPF_HASH(shed, struct shed_key, u64, SHED_ENTRIES);
// ... and where even the port-less key found no room: per class, exact all the same
BPF_ARRAY(shed_unkeyed, u64, CLASS_COUNT);

static __always_inline u64 rd64(u64 p) { u64 v = 0; bpf_probe_read_kernel(&v, 8, (void *)p); return v; }
static __always_inline u32 rd32(u64 p) { u32 v = 0; bpf_probe_read_kernel(&v, 4, (void *)p); return v; }
static __always_inline u16 rd16(u64 p) { u16 v = 0; bpf_probe_read_kernel(&v, 2, (void *)p); return v; }
static __always_inline u8 rd8(u64 p) { u8 v = 0; bpf_probe_read_kernel(&v, 1, (void *)p); return v; }

// Events are built in place, in a ring buffer: reserved once the probe knows it will report
// and in which lane (a record is too big for the BPF stack next to the headers it copies).
static __always_inline void event_init(struct rst_event *e, u32 kind, u16 probe)
{
    __builtin_memset(e, 0, sizeof(*e));
    e->kind = kind;
    e->probe_id = probe;
    e->ts_ns = bpf_ktime_get_ns();
    e->sk_state = 0xff;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
}

// the root-cause lane
static __always_inline struct rst_event *event_reserve(u32 kind, u16 probe)
{
    struct rst_event *e = events.ringbuf_reserve(sizeof(struct rst_event));
    if (!e) {
        u32 zero = 0;
        u64 *lost = lost_events.lookup(&zero);
        if (lost)
            (*lost)++;
        return 0;
    }
    event_init(e, kind, probe);
    return e;
}

static __always_inline void count_shed(u32 netns, u16 klass, u16 port)
{
    struct shed_key key = {.netns = netns, .klass = klass, .port = port};
    u64 zero = 0;
    u64 *n = shed.lookup_or_try_init(&key, &zero);
    if (!n) {
        key.port = 0;
        n = shed.lookup_or_try_init(&key, &zero);
    }
    if (n) {
        __sync_fetch_and_add(n, 1);
        return;
    }
    u32 idx = klass;
    n = shed_unkeyed.lookup(&idx);
    if (n)
        __sync_fetch_and_add(n, 1);
}

// the ordinary lane: NULL when the event is shed (a storm, or the ring is full), counted
static __always_inline struct rst_event *ordinary_reserve(u32 kind, u16 probe, u32 netns, u16 klass, u16 port)
{
    struct rst_event *e = 0;
    if (!storming.lookup(&netns))
        e = ordinary.ringbuf_reserve(sizeof(struct rst_event));
    if (!e) {
        count_shed(netns, klass, port);
        return 0;
    }
    event_init(e, kind, probe);
    return e;
}

static __always_inline void event_submit(struct rst_event *e)
{
    events.ringbuf_submit(e, 0);
}


static __always_inline u32 netns_of_net(u64 net)
{
    return net ? rd32(net + OFF_NET_NS_INUM) : 0;
}

static __always_inline u32 netns_of_sock(u64 sk)
{
    return netns_of_net(rd64(sk + OFF_SOCK_SKC_NET));
}

static __always_inline int skb_is_tcp(u64 skb)
{
    u64 head = rd64(skb + OFF_SKB_HEAD);
    u16 nh = rd16(skb + OFF_SKB_NETWORK_HEADER);
    u8 first = rd8(head + nh);
    if ((first >> 4) == 4)
        return rd8(head + nh + offsetof(struct wire_ipv4, protocol)) == PROTO_TCP;
    if ((first >> 4) == 6)  // extension headers are not followed: TCP right after the header
        return rd8(head + nh + offsetof(struct wire_ipv6, nexthdr)) == PROTO_TCP;
    return 0;
}

static __always_inline void read_ct_tuples(struct rst_event *e, u64 ct)
{
    u64 orig = ct + OFF_NF_CONN_TUPLEHASH + OFF_TUPLE_HASH_TUPLE;
    u64 reply = orig + SIZEOF_TUPLE_HASH;
    bpf_probe_read_kernel(e->ct_orig_saddr, 16, (void *)(orig + OFF_TUPLE_SRC_U3));
    bpf_probe_read_kernel(e->ct_orig_daddr, 16, (void *)(orig + OFF_TUPLE_DST_U3));
    e->ct_orig_sport = bpf_ntohs(rd16(orig + OFF_TUPLE_SRC_PORT));
    e->ct_orig_dport = bpf_ntohs(rd16(orig + OFF_TUPLE_DST_PORT));
    bpf_probe_read_kernel(e->ct_reply_saddr, 16, (void *)(reply + OFF_TUPLE_SRC_U3));
    bpf_probe_read_kernel(e->ct_reply_daddr, 16, (void *)(reply + OFF_TUPLE_DST_U3));
    e->ct_reply_sport = bpf_ntohs(rd16(reply + OFF_TUPLE_SRC_PORT));
    e->ct_reply_dport = bpf_ntohs(rd16(reply + OFF_TUPLE_DST_PORT));
}

static __always_inline void fill_from_skb(struct rst_event *e, u64 skb)
{
    u64 head = rd64(skb + OFF_SKB_HEAD);
    u16 nh = rd16(skb + OFF_SKB_NETWORK_HEADER);
    u16 th = rd16(skb + OFF_SKB_TRANSPORT_HEADER);
    u8 first = rd8(head + nh);
    u32 l3_payload = 0;
    e->has_skb = 1;
    if ((first >> 4) == 4) {
        struct wire_ipv4 ip = {};
        bpf_probe_read_kernel(&ip, sizeof(ip), (void *)(head + nh));
        u32 ihl = (ip.ver_ihl & 0xf) * 4;
        e->family = 4;
        __builtin_memcpy(e->saddr, &ip.saddr, 4);
        __builtin_memcpy(e->daddr, &ip.daddr, 4);
        l3_payload = bpf_ntohs(ip.tot_len) - ihl;
        // transport_header is not always set yet on the netfilter path: derive it
        th = nh + ihl;
    } else if ((first >> 4) == 6) {
        struct wire_ipv6 ip6 = {};
        bpf_probe_read_kernel(&ip6, sizeof(ip6), (void *)(head + nh));
        e->family = 6;
        bpf_probe_read_kernel(e->saddr, 16, &ip6.saddr);
        bpf_probe_read_kernel(e->daddr, 16, &ip6.daddr);
        l3_payload = bpf_ntohs(ip6.payload_len);
        th = nh + sizeof(struct wire_ipv6);
    }
    struct wire_tcp tcp = {};
    bpf_probe_read_kernel(&tcp, sizeof(tcp), (void *)(head + th));
    e->sport = bpf_ntohs(tcp.source);
    e->dport = bpf_ntohs(tcp.dest);
    e->seq = bpf_ntohl(tcp.seq);
    e->ack = bpf_ntohl(tcp.ack_seq);
    e->window = bpf_ntohs(tcp.window);
    e->tcp_flags = tcp.flags;
    u32 doff = (tcp.doff_res >> 4) * 4;
    e->payload_len = l3_payload > doff ? l3_payload - doff : 0;

    u64 nfct = rd64(skb + OFF_SKB_NFCT);
    u64 ct = nfct & ~7ULL;
    e->ctinfo = nfct & 7;
    if (ct) {
        e->has_ct = 1;
        e->ct_status = rd32(ct + OFF_NF_CONN_STATUS);
        read_ct_tuples(e, ct);
    }
    // skb_iif survives where the stack has reused skb->dev (TCP receive path)
    e->ifindex = rd32(skb + OFF_SKB_SKB_IIF);
    u64 dev = rd64(skb + OFF_SKB_DEV);
    if (dev) {
        if (!e->ifindex)
            e->ifindex = rd32(dev + OFF_NET_DEVICE_IFINDEX);
        e->netns = netns_of_net(rd64(dev + OFF_NET_DEVICE_ND_NET));
    }
}

// Socket side: the netns always; the tuple too when there is no segment to read it from.
static __always_inline void fill_from_sock(struct rst_event *e, u64 sk, int tuple_from_sock)
{
    e->sk_state = rd8(sk + OFF_SOCK_SKC_STATE);
    if (e->sk_state == TCP_STATE_LISTEN) {
        // a listener resetting a handshake's ACK: was its accept queue full?
        u32 q = rd32(sk + OFF_SOCK_SK_ACK_BACKLOG), max = rd32(sk + OFF_SOCK_SK_MAX_ACK_BACKLOG);
        e->accept_queue = q > 0xffff ? 0xffff : q;
        e->accept_queue_max = max > 0xffff ? 0xffff : max;
    }
    if (!e->netns)
        e->netns = netns_of_net(rd64(sk + OFF_SOCK_SKC_NET));
    if (!tuple_from_sock)
        return;
    // a reset with no segment: from the keepalive timer, probes went unanswered (the only
    // way to tell it from an application's abort before sk_rst_reason, 6.10)
    if (e->sk_state != TCP_STATE_LISTEN)
        e->probes_out = rd8(sk + OFF_ICSK_PROBES_OUT);
    u16 family = rd16(sk + OFF_SOCK_SKC_FAMILY);
    // oriented as the RST travels for received resets: from the peer to us
    if (family == FAMILY_INET) {
        e->family = 4;
        bpf_probe_read_kernel(e->saddr, 4, (void *)(sk + OFF_SOCK_SKC_DADDR));
        bpf_probe_read_kernel(e->daddr, 4, (void *)(sk + OFF_SOCK_SKC_RCV_SADDR));
    } else if (family == FAMILY_INET6) {
        e->family = 6;
        bpf_probe_read_kernel(e->saddr, 16, (void *)(sk + OFF_SOCK_SKC_V6_DADDR));
        bpf_probe_read_kernel(e->daddr, 16, (void *)(sk + OFF_SOCK_SKC_V6_RCV_SADDR));
    }
    e->sport = bpf_ntohs(rd16(sk + OFF_SOCK_SKC_DPORT));
    e->dport = rd16(sk + OFF_SOCK_SKC_NUM);
    if (!e->dport)  // a socket being destroyed has released its bound port number
        e->dport = bpf_ntohs(rd16(sk + OFF_INET_SOCK_INET_SPORT));
}

// -- the process of a socket -----------------------------------------------------------
// A RST is handled in softirq context, where the current task is whoever was interrupted:
// the socket's process is learnt where it is certain instead. connect() moves a socket to
// SYN_SENT in the caller's context, listen() to LISTEN in the listener's; a handshake's
// child is cloned from its listener (LISTEN -> SYN_RECV) and takes the listener's process
// (the one that accepts it, or with a prefork server its parent). Every socket that can
// reset went through one of these, so an entry left by a freed socket is overwritten before
// its address is used again. Sockets older than the tracer: user space (tracer/owners.py).
struct owner {
    u32 pid;
    u8 how;                 // OWNER_*
    char comm[16];
};
struct listen_key {
    u32 netns;
    u32 port;
};
struct listener {
    u64 sk;                 // the listening socket: only its own close removes the entry
    struct owner owner;
};
BPF_TABLE("lru_hash", u64, struct owner, sock_owners, OWNER_ENTRIES);
BPF_TABLE("lru_hash", struct listen_key, struct listener, listeners, LISTENER_ENTRIES);

static __always_inline struct listen_key listen_key_of(u64 sk)
{
    struct listen_key key = {.netns = netns_of_sock(sk), .port = rd16(sk + OFF_SOCK_SKC_NUM)};
    return key;
}

// the entry of the listener on sk's port if it is sk's own (a listener's close, a listener's RST)
static __always_inline struct listener *own_listener(u64 sk, struct listen_key *key)
{
    struct listener *l = listeners.lookup(key);
    return l && l->sk == sk ? l : 0;
}

static __always_inline void current_owner(struct owner *o, u8 how)
{
    o->pid = bpf_get_current_pid_tgid() >> 32;
    o->how = how;
    bpf_get_current_comm(o->comm, sizeof(o->comm));
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    // (const struct sock *sk, const int oldstate, const int newstate): a few per connection,
    // so the common transitions return after two comparisons
    u64 sk = ctx->args[0];
    int old = ctx->args[1], new = ctx->args[2];
    if (new == TCP_STATE_SYN_SENT) {
        struct owner o = {};
        current_owner(&o, OWNER_CONNECT);
        sock_owners.update(&sk, &o);
        return 0;
    }
    if (new != TCP_STATE_LISTEN && old != TCP_STATE_LISTEN)
        return 0;
    struct listen_key key = listen_key_of(sk);
    if (new == TCP_STATE_LISTEN) {
        struct listener l = {.sk = sk};
        current_owner(&l.owner, OWNER_LISTEN);
        listeners.update(&key, &l);
    } else if (new == TCP_STATE_SYN_RECV) {
        struct listener *l = listeners.lookup(&key);
        if (l)
            sock_owners.update(&sk, &l->owner);
        else
            sock_owners.delete(&sk);
    } else if (new == TCP_STATE_CLOSE && own_listener(sk, &key)) {
        listeners.delete(&key);
    }
    return 0;
}

static __always_inline void fill_owner(struct rst_event *e, u64 sk)
{
    struct owner *o = sock_owners.lookup(&sk);
    if (!o && e->sk_state == TCP_STATE_LISTEN) {
        struct listen_key key = listen_key_of(sk);
        struct listener *l = own_listener(sk, &key);
        if (l)
            o = &l->owner;
    }
    if (!o)
        return;
    e->owner_pid = o->pid;
    e->owner_how = o->how;
    __builtin_memcpy(e->owner_comm, o->comm, sizeof(e->owner_comm));
}

// -- handlers both backends attach as they are ------------------------------------------
// What a probe needs to know of a segment before it chooses a lane.
struct peek {
    u32 netns;
    u32 ct_status;  // its conntrack entry's status, 0 without one
    u16 dport;      // the local port, for a segment that arrived
    u8 flags;
    u8 nat;         // its conntrack entry is NATed
};

static __always_inline void peek_segment(u64 skb, struct peek *p)
{
    u64 head = rd64(skb + OFF_SKB_HEAD);
    u16 nh = rd16(skb + OFF_SKB_NETWORK_HEADER);
    u8 first = rd8(head + nh);
    u64 th = head + nh + ((first >> 4) == 4 ? (first & 0xf) * 4 : sizeof(struct wire_ipv6));
    p->flags = rd8(th + offsetof(struct wire_tcp, flags));
    p->dport = bpf_ntohs(rd16(th + offsetof(struct wire_tcp, dest)));
    u64 dev = rd64(skb + OFF_SKB_DEV);
    p->netns = dev ? netns_of_net(rd64(dev + OFF_NET_DEVICE_ND_NET)) : 0;
    u64 ct = rd64(skb + OFF_SKB_NFCT) & ~7ULL;
    p->ct_status = ct ? rd32(ct + OFF_NF_CONN_STATUS) : 0;
    p->nat = !!(p->ct_status & (IPS_SRC_NAT | IPS_DST_NAT));
}

// A RST this host sends: for the segment skb (sk: the socket that had it, NULL for none), or
// with no segment, from the socket itself (an abort, the keepalive timer).
static __always_inline int report_reset_sent(u64 sk, u64 skb, u32 reason, u16 probe)
{
    struct peek p = {};
    u8 state = sk ? rd8(sk + OFF_SOCK_SKC_STATE) : 0xff;
    u16 klass = CLASS_SOCKET_RESET;
    int cause = 0;
    if (skb) {
        peek_segment(skb, &p);
        if (p.flags & TCP_FLAG_RST)
            return 0;   // never answer a reset: tcp_v4_send_reset returns, nothing is sent
        int syn = (p.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
        // a segment no connection owns (no socket, or only a listener): conntrack may be why
        cause = p.nat || (!syn && (!sk || state == TCP_STATE_LISTEN));
        if (!sk && syn)
            klass = CLASS_NO_LISTENER;
        else if (state == TCP_STATE_TIME_WAIT)
            klass = CLASS_TIMEWAIT;
    } else if (sk) {
        p.dport = rd16(sk + OFF_SOCK_SKC_NUM);
    }
    if (!p.netns && sk)
        p.netns = netns_of_sock(sk);
    struct rst_event *e = cause ? event_reserve(KIND_RST_SENT, probe)
                                : ordinary_reserve(KIND_RST_SENT, probe, p.netns, klass, p.dport);
    if (!e)
        return 0;
    e->reason = reason;
    e->sk = sk;
    e->skb = skb;
    if (skb)
        fill_from_skb(e, skb);
    if (sk) {
        fill_from_sock(e, sk, !skb);
        fill_owner(e, sk);
    }
    event_submit(e);
    return 0;
}

// tcp_receive_reset(sk): a RST arrived on a local socket (counted by the peer's port: the
// local one of a client is ephemeral).
static __always_inline int report_receive_reset(u64 sk, u16 probe)
{
    struct rst_event *e = ordinary_reserve(KIND_RST_RECEIVED, probe, netns_of_sock(sk), CLASS_PEER_RESET,
                                           bpf_ntohs(rd16(sk + OFF_SOCK_SKC_DPORT)));
    if (!e)
        return 0;
    e->sk = sk;
    fill_from_sock(e, sk, 1);
    fill_owner(e, sk);
    event_submit(e);
    return 0;
}

// kfree_skb(skb, location, reason): a TCP packet dropped for a reason worth attributing
// (the caller filtered on the reason or, before 5.17, on the call site; `filter` is a
// DROP_* of tracer/record.py). A listen overflow is ordinary; a netfilter drop may be a root
// cause (NAT clash, table full, INVALID); a drop with no reason only when it is a SYN whose
// entry is SNATed and not confirmed (a clash at confirm after an NFQUEUE verdict is freed by
// nf_reinject with none).
static __always_inline int report_drop(u64 skb, u64 location, u32 reason, u16 probe, u8 filter)
{
    if (!skb_is_tcp(skb))
        return 0;
    struct peek p = {};
    if (filter != DROP_ROOT_CAUSE)
        peek_segment(skb, &p);
    if (filter == DROP_UNCONFIRMED_NAT_SYN &&
        ((p.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN || !(p.ct_status & IPS_SRC_NAT) ||
         (p.ct_status & IPS_CONFIRMED)))
        return 0;
    struct rst_event *e = filter == DROP_ORDINARY
        ? ordinary_reserve(KIND_SKB_DROPPED, probe, p.netns, CLASS_LISTEN_OVERFLOW, p.dport)
        : event_reserve(KIND_SKB_DROPPED, probe);
    if (!e)
        return 0;
    e->reason = reason;
    e->skb = skb;
    e->location = location;
    fill_from_skb(e, skb);
    event_submit(e);
    return 0;
}

// -- network namespaces, from birth --------------------------------------------------------
// Namespaces user space already watches (seeded by it); any other one a task shows up in is
// reported once. Conntrack tells a namespace's deletions only to listeners subscribed there
// before the entry was created: a namespace must be watched as soon as it exists.
BPF_TABLE("lru_hash", u32, u8, known_netns, 8192);
#define CLONE_NEWNET 0x40000000

static __always_inline u32 netns_of_task(u64 task)
{
    return netns_of_net(rd64(rd64(task + OFF_TASK_NSPROXY) + OFF_NSPROXY_NET_NS));
}

static __always_inline int report_netns(u64 task)
{
    u32 netns = netns_of_task(task);
    if (!netns || known_netns.lookup(&netns))
        return 0;
    u8 one = 1;
    known_netns.update(&netns, &one);
    struct rst_event *e = event_reserve(KIND_NETNS_BORN, 0);
    if (!e)
        return 0;
    e->netns = netns;
    e->pid = rd32(task + OFF_TASK_TGID);   // the task in the namespace, not its parent
    event_submit(e);
    return 0;
}

// task_newtask(task, clone_flags): clone() with CLONE_NEWNET (LXC, `unshare -f`, runtimes)
RAW_TRACEPOINT_PROBE(task_newtask)
{
    if (!(ctx->args[1] & CLONE_NEWNET))
        return 0;
    return report_netns(ctx->args[0]);
}

// sched_process_exec(p, old_pid, bprm): unshare(CLONE_NEWNET) then exec (`unshare -n cmd`,
// services with PrivateNetwork=). Namespaces that only get a bind mount (`ip netns add`,
// container runtimes) are found by user space from the mount table.
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    return report_netns(ctx->args[0]);
}

#endif
