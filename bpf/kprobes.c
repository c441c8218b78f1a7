// rst-tracer, kprobe backend: stock distro kernels (kprobes on), the precise evidence.
//
// Same record (struct rst_event, common.h) into the same ring buffer as the tracepoint
// backend, so decode and attribution are shared. Offsets, enum values and signature
// differences come from the running kernel's BTF, kallsyms and version, passed by
// tracer/probes/kprobe.py as -D defines or, for modules that load later, through the
// `config` array. Functions here are attached one by one from user space (none has an
// auto-attach name): a probe whose function the kernel lacks is never loaded.
//
// Nothing here runs per packet of an established flow: resets (rare), conntrack's INVALID
// log (slow path), NAT setup and confirm (once per new connection), deletions (once per
// entry), masquerade notifiers (address/device events), and the kfree_skb tracepoint
// (drops only, filtered in the kernel).
#include <uapi/linux/ptrace.h>     // struct pt_regs: the architecture's ABI, for PT_REGS_PARM*

#include "common.h"

// probe ids (PROBE_*) and delete reasons (DEL_*): -D defines from tracer/record.py

#define NF_NAT_MANIP_SRC 0
#define NETDEV_DOWN 2
#define TCP_CONNTRACK_SYN_SENT 1    // enum tcp_conntrack (uapi, stable)
// a masquerade walk flag older than this is stale (its return probe was missed)
#define WALK_MAX_NS (30ULL * 1000000000ULL)
#define MASQ_DETAIL_MAX_NS (120ULL * 1000000000ULL)

// config slots set from user space (a module's signature is known only once it loads)
#define CFG_LOG_INVALID_FMT_ARG 0      // 3: (skb, ct, fmt, ...) <= 5.13; 4: (skb, ct, state, fmt, ...)
#define CFG_DELETE_AFTER_DYING 1       // 1: the probed body of nf_ct_delete runs after it set IPS_DYING
BPF_ARRAY(config, u32, 4);

static __always_inline u64 ct_tuple(u64 ct, u32 dir)
{
    return ct + OFF_NF_CONN_TUPLEHASH + dir * SIZEOF_TUPLE_HASH + OFF_TUPLE_HASH_TUPLE;
}

static __always_inline int ct_is_tcp(u64 ct)
{
    return rd8(ct_tuple(ct, 0) + OFF_TUPLE_DST_PROTONUM) == PROTO_TCP;
}

// A conntrack entry on its own (no segment): tuples, status, TCP state, netns, time left.
static __always_inline void fill_from_ct(struct rst_event *e, u64 ct)
{
    u32 status = rd32(ct + OFF_NF_CONN_STATUS);
    e->has_ct = 1;
    e->ct_status = status;
    read_ct_tuples(e, ct);
    e->ct_family = rd16(ct_tuple(ct, 0) + OFF_TUPLE_SRC_L3NUM) == FAMILY_INET6 ? 6 : 4;
    e->ct_tcp_state = rd8(ct + OFF_NF_CONN_TCP_STATE);
    if (!e->netns)
        e->netns = netns_of_net(rd64(ct + OFF_NF_CONN_CT_NET));
    // the timeout is absolute (jiffies) once confirmed, relative before
    if (status & IPS_CONFIRMED) {
        s32 left = (s32)(rd32(ct + OFF_NF_CONN_TIMEOUT) - (u32)bpf_jiffies64());
        e->ct_timeout_left = left > 0 ? (u32)left / KERNEL_HZ : 0;
    }
}

// -- resets sent ------------------------------------------------------------------------
// enum sk_rst_reason, read from the argument BTF names `reason` (*_REASON_ARG, 0: the
// kernel has none); its position moves: tcp_send_active_reset lost `priority` in 6.12.
#define RESET_REASON(ctx, arg) ((arg) == 3 ? PT_REGS_PARM3(ctx) : (arg) == 2 ? PT_REGS_PARM2(ctx) : 0)

// tcp_v4_send_reset / tcp_v6_send_reset (sk, skb[, enum sk_rst_reason]): skb is the segment
// that drew the RST, sk NULL when no socket. The functions return early for an incoming RST
// ("never answer a reset"): that is no RST sent, so it is not reported.
static __always_inline int send_reset(struct pt_regs *ctx, u16 probe)
{
    return report_reset_sent(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), RESET_REASON(ctx, SEND_RESET_REASON_ARG),
                             probe);
}

int kp_tcp_v4_send_reset(struct pt_regs *ctx) { return send_reset(ctx, PROBE_TCP_V4_SEND_RESET); }
int kp_tcp_v6_send_reset(struct pt_regs *ctx) { return send_reset(ctx, PROBE_TCP_V6_SEND_RESET); }

// tcp_send_active_reset(sk, priority[, reason]): the application's own aborts
int kp_tcp_send_active_reset(struct pt_regs *ctx)
{
    u64 sk = PT_REGS_PARM1(ctx);
    if (!sk)
        return 0;
    return report_reset_sent(sk, 0, RESET_REASON(ctx, ACTIVE_RESET_REASON_ARG), PROBE_TCP_SEND_ACTIVE_RESET);
}

// -- resets received --------------------------------------------------------------------
int tp_tcp_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
    return report_receive_reset(ctx->args[0], PROBE_TCP_RECEIVE_RESET);
}

// fallback where the tracepoint is missing: tcp_reset(sk[, skb])
int kp_tcp_reset(struct pt_regs *ctx)
{
    return report_receive_reset(PT_REGS_PARM1(ctx), PROBE_TCP_RESET);
}

// -- drops ------------------------------------------------------------------------------
#if KFREE_SKB_HAS_REASON
// index = enum skb_drop_reason value, filled by user space
BPF_ARRAY(wanted_drop_reasons, u8, 256);
#else
// [start, end) of nf_hook_slow: where netfilter frees the packets its hooks drop
BPF_ARRAY(nf_hook_slow_range, u64, 2);
#endif

int tp_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
    u64 skb = ctx->args[0];
    u32 reason = 0;
    u16 probe = PROBE_KFREE_SKB;
    u8 filter = DROP_ROOT_CAUSE;
#if KFREE_SKB_HAS_REASON
    reason = ctx->args[2];
    u32 idx = reason;
    u8 *wanted = wanted_drop_reasons.lookup(&idx);
    if (!wanted || !*wanted)
        return 0;
    filter = *wanted;
#else
    u64 loc = ctx->args[1];
    u32 i0 = 0, i1 = 1;
    u64 *lo = nf_hook_slow_range.lookup(&i0), *hi = nf_hook_slow_range.lookup(&i1);
    if (!lo || !hi || !*lo || loc < *lo || loc >= *hi)
        return 0;
    probe = PROBE_KFREE_SKB_NF_HOOK;
#endif
    return report_drop(skb, ctx->args[1], reason, probe, filter);
}

// -- conntrack INVALID, with the kernel's reason -----------------------------------------
// nf_ct_l4proto_log_invalid is variadic and called on the slow path only (every INVALID,
// and on >= 6.1 IGNORE, TCP verdict, whether logging is on or not):
//   <= 5.13  (skb, ct, fmt, ...)           5.10 tcp_in_window: fmt "%s", the message next
//   >= 5.14  (skb, ct, state, fmt, ...)    6.1: fmt "%pV" and a struct va_format * whose
//            fmt is the template and whose va_list holds its values; 6.12: the template
//            itself, its value next
static __always_inline u64 va_arg_u64(u32 *gp, u64 *overflow, u64 reg_save)
{
    // x86-64 SysV va_list: general registers first (6 x 8 bytes), then the stack
    u64 v;
    if (*gp < 48) {
        v = rd64(reg_save + *gp);
        *gp += 8;
    } else {
        v = rd64(*overflow);
        *overflow += 8;
    }
    return v;
}

int kp_log_invalid(struct pt_regs *ctx)
{
    u64 skb = PT_REGS_PARM1(ctx), ct = PT_REGS_PARM2(ctx);
    u32 zero = CFG_LOG_INVALID_FMT_ARG;
    u32 *fmt_arg = config.lookup(&zero);
    u64 p3 = PT_REGS_PARM3(ctx), p4 = PT_REGS_PARM4(ctx), p5 = PT_REGS_PARM5(ctx), p6 = PT_REGS_PARM6(ctx);
    // keep the register reads unconditional: the verifier refuses a computed ctx offset
    asm volatile("" : "+r"(p3), "+r"(p4), "+r"(p5), "+r"(p6));
    if (!fmt_arg || !skb || !ct)
        return 0;
    int fmt3 = *fmt_arg == 3;
    u64 fmt = fmt3 ? p3 : p4, a1 = fmt3 ? p4 : p5, a2 = fmt3 ? p5 : p6;
    if (!ct_is_tcp(ct))
        return 0;
    struct rst_event *e = event_reserve(KIND_CT_INVALID, PROBE_LOG_INVALID);
    if (!e)
        return 0;
    e->skb = skb;
    fill_from_skb(e, skb);      // the segment as it travelled
    fill_from_ct(e, ct);        // conntrack's entry (the skb may not point at it any more)
    bpf_probe_read_kernel_str(e->inv_msg, sizeof(e->inv_msg), (void *)fmt);
    if (e->inv_msg[0] == '%' && e->inv_msg[1] == 'p' && e->inv_msg[2] == 'V' && e->inv_msg[3] == 0) {
        u64 tmpl = rd64(a1 + OFF_VA_FORMAT_FMT);
        u64 va = rd64(a1 + OFF_VA_FORMAT_VA);
        u32 gp = rd32(va);
        u64 overflow = rd64(va + 8), reg_save = rd64(va + 16);
        bpf_probe_read_kernel_str(e->inv_msg, sizeof(e->inv_msg), (void *)tmpl);
        e->inv_value[0] = va_arg_u64(&gp, &overflow, reg_save);
        e->inv_value[1] = va_arg_u64(&gp, &overflow, reg_save);
    } else if (e->inv_msg[0] == '%' && e->inv_msg[1] == 's' && e->inv_msg[2] == 0) {
        bpf_probe_read_kernel_str(e->inv_msg, sizeof(e->inv_msg), (void *)a1);
    } else {
        e->inv_value[0] = a1;
        e->inv_value[1] = a2;
    }
    // the first value as a string, for templates whose first conversion is %s (a number
    // is no kernel address: the read fails harmlessly)
    if (bpf_probe_read_kernel_str(e->inv_str, sizeof(e->inv_str), (void *)e->inv_value[0]) > 0)
        e->inv_flags |= 1;
    // the window conntrack compared against: seen[0] original direction, seen[1] reply
#pragma unroll
    for (int i = 0; i < 2; i++) {
        u64 s = ct + OFF_NF_CONN_TCP_SEEN + i * SIZEOF_TCP_STATE;
        e->ct_window[i * 4 + 0] = rd32(s + OFF_TCP_STATE_TD_END);
        e->ct_window[i * 4 + 1] = rd32(s + OFF_TCP_STATE_TD_MAXEND);
        e->ct_window[i * 4 + 2] = rd32(s + OFF_TCP_STATE_TD_MAXWIN);
        e->ct_window[i * 4 + 3] = rd8(s + OFF_TCP_STATE_TD_SCALE);
    }
    event_submit(e);
    return 0;
}

// -- NAT bindings ------------------------------------------------------------------------
// nf_nat_setup_info(ct, range, maniptype), once per new connection and manip type: the
// rule's range flags, kept by entry until the binding is final.
BPF_TABLE("lru_hash", u64, u32, nat_flags_by_ct, 16384);

int kp_nat_setup_info(struct pt_regs *ctx)
{
    u64 ct = PT_REGS_PARM1(ctx), range = PT_REGS_PARM2(ctx);
    u32 manip = PT_REGS_PARM3(ctx);
    if (manip != NF_NAT_MANIP_SRC || !ct || !ct_is_tcp(ct))
        return 0;
    // struct nf_nat_range2 (uapi): flags is the first member
    u32 flags = range ? rd32(range) : 0;
    nat_flags_by_ct.update(&ct, &flags);
    return 0;
}

// __nf_conntrack_confirm(skb), once per new connection: the chosen tuple is in the reply
// tuple by now. A SNATed TCP entry conntrack picked up mid-stream (not from a SYN: the
// client of an entry that was flushed or expired, re-NATed) is reported as a binding; an
// ordinary connection is not (that would be an event per connection).
int kp_conntrack_confirm(struct pt_regs *ctx)
{
    u64 skb = PT_REGS_PARM1(ctx);
    u64 ct = rd64(skb + OFF_SKB_NFCT) & ~7ULL;
    if (!ct)
        return 0;
    u32 *flags = nat_flags_by_ct.lookup(&ct);
    if (!flags)
        return 0;
    u32 nat_flags = *flags;
    if (!(rd32(ct + OFF_NF_CONN_STATUS) & IPS_SRC_NAT) || rd8(ct + OFF_NF_CONN_TCP_STATE) == TCP_CONNTRACK_SYN_SENT)
        return 0;
    struct rst_event *e = event_reserve(KIND_NAT_BINDING, PROBE_NAT_CONFIRM);
    if (!e)
        return 0;
    fill_from_ct(e, ct);
    e->nat_range_flags = nat_flags;
    event_submit(e);
    return 0;
}

// nf_ct_resolve_clash(skb, h, ...): the skb's new entry clashed at confirm with the entry
// of h, already in the table (TCP never resolves a clash: the SYN is dropped next).
// Reported again as a binding right before the drop, so that it is the one remembered for
// the contested reply tuple.
int kp_resolve_clash(struct pt_regs *ctx)
{
    u64 skb = PT_REGS_PARM1(ctx), h = PT_REGS_PARM2(ctx);
    u64 loser = rd64(skb + OFF_SKB_NFCT) & ~7ULL;
    if (!loser || !h || !ct_is_tcp(loser) || !(rd32(loser + OFF_NF_CONN_STATUS) & IPS_SRC_NAT))
        return 0;
    u8 dir = rd8(h + OFF_TUPLE_HASH_TUPLE + OFF_TUPLE_DST_DIR);
    u64 winner = h - OFF_NF_CONN_TUPLEHASH - (dir ? SIZEOF_TUPLE_HASH : 0);
    struct rst_event *e = event_reserve(KIND_NAT_BINDING, PROBE_CLASH_WINNER);
    if (!e)
        return 0;
    fill_from_ct(e, winner);
    u32 *flags = nat_flags_by_ct.lookup(&winner);
    if (flags)
        e->nat_range_flags = *flags;
    event_submit(e);
    return 0;
}

// -- who deletes NATed entries -----------------------------------------------------------
// Masquerade walks: the address/device notifiers (5.10 walks the table synchronously from
// masq_inet_event -> masq_device_event; later kernels and IPv6 from a work item,
// iterate_cleanup_work). Entry sets a flag for the task, the return probe clears it.
BPF_HASH(masq_walk, u32, u64, 1024);           // tid -> ns when it entered
struct masq_detail {
    u64 ts;
    u32 ifindex;
    u8 family;      // 4/6: addr is the removed address; 0: the device went down
    u8 pad[3];
    u8 addr[16];
    char ifname[16];
};
// per netns, the last trigger of each kind: a link going down also removes its IPv6
// addresses, and only the device event explains the flush of an IPv4 entry
struct masq_key {
    u32 netns;
    u32 family;     // 0: device down, 4/6: address removal
};
BPF_HASH(masq_detail, struct masq_key, struct masq_detail, 1024);

static __always_inline int masq_trigger(struct pt_regs *ctx, u64 dev, u8 family, u64 addr, u16 probe)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    u64 *inside = masq_walk.lookup(&tid);
    if (inside && now - *inside < WALK_MAX_NS)
        return 0;   // 5.10: masq_inet_event calling masq_device_event: keep the address
    masq_walk.update(&tid, &now);
    if (!dev)
        return 0;
    u32 netns = netns_of_net(rd64(dev + OFF_NET_DEVICE_ND_NET));
    struct masq_detail d = {};
    d.ts = now;
    d.ifindex = rd32(dev + OFF_NET_DEVICE_IFINDEX);
    d.family = family;
    if (family)
        bpf_probe_read_kernel(d.addr, family == 6 ? 16 : 4, (void *)addr);
    bpf_probe_read_kernel_str(d.ifname, sizeof(d.ifname), (void *)(dev + OFF_NET_DEVICE_NAME));
    struct masq_key key = {.netns = netns, .family = family};
    masq_detail.update(&key, &d);

    struct rst_event *e = event_reserve(KIND_MASQ_NOTIFIER, probe);
    if (!e)
        return 0;
    e->netns = netns;
    e->ifindex = d.ifindex;
    e->notifier_cb = PT_REGS_IP(ctx);
    e->detail_ifindex = d.ifindex;
    e->detail_family = family;
    __builtin_memcpy(e->detail_addr, d.addr, 16);
    __builtin_memcpy(e->detail_ifname, d.ifname, 16);
    event_submit(e);
    return 0;
}

// masq_inet_event(nb, event, struct in_ifaddr *)
int kp_masq_inet_event(struct pt_regs *ctx)
{
    if (PT_REGS_PARM2(ctx) != NETDEV_DOWN)
        return 0;
    u64 ifa = PT_REGS_PARM3(ctx);
    u64 dev = rd64(rd64(ifa + OFF_IN_IFADDR_IFA_DEV) + OFF_IN_DEVICE_DEV);
    return masq_trigger(ctx, dev, 4, ifa + OFF_IN_IFADDR_IFA_ADDRESS, PROBE_MASQ_INET);
}

// masq_inet6_event(nb, event, struct inet6_ifaddr *)
int kp_masq_inet6_event(struct pt_regs *ctx)
{
    if (PT_REGS_PARM2(ctx) != NETDEV_DOWN)
        return 0;
    u64 ifa = PT_REGS_PARM3(ctx);
    u64 dev = rd64(rd64(ifa + OFF_INET6_IFADDR_IDEV) + OFF_INET6_DEV_DEV);
    return masq_trigger(ctx, dev, 6, ifa + OFF_INET6_IFADDR_ADDR, PROBE_MASQ_INET6);
}

// masq_device_event(nb, event, struct netdev_notifier_info *)
int kp_masq_device_event(struct pt_regs *ctx)
{
    if (PT_REGS_PARM2(ctx) != NETDEV_DOWN)
        return 0;
    u64 dev = rd64(PT_REGS_PARM3(ctx) + OFF_NETDEV_NOTIFIER_INFO_DEV);
    return masq_trigger(ctx, dev, 0, 0, PROBE_MASQ_DEVICE);
}

// iterate_cleanup_work(work): the deferred walk
int kp_masq_walk_begin(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    masq_walk.update(&tid, &now);
    return 0;
}

// return of any of the four
int kr_masq_walk_end(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    masq_walk.delete(&tid);
    return 0;
}

// early_drop(net, hash): the table is full and an entry is evicted (per CPU: packet path)
BPF_PERCPU_ARRAY(in_early_drop, u64, 1);

int kp_early_drop(struct pt_regs *ctx)
{
    u32 zero = 0;
    u64 now = bpf_ktime_get_ns();
    in_early_drop.update(&zero, &now);
    return 0;
}

int kr_early_drop(struct pt_regs *ctx)
{
    u32 zero = 0;
    u64 none = 0;
    in_early_drop.update(&zero, &none);
    return 0;
}

static __always_inline struct masq_detail *recent_detail(u32 netns, u32 family, u64 now)
{
    struct masq_key key = {.netns = netns, .family = family};
    struct masq_detail *d = masq_detail.lookup(&key);
    return d && now - d->ts < MASQ_DETAIL_MAX_NS ? d : 0;
}

// The trigger that can have flushed this entry (e: its tuples already read): the removal
// of its own NAT address, else the latest of a device-down and the removal of another
// address of its family (5.10 flushes the whole device on any IPv4 address removal).
static __always_inline struct masq_detail *masq_detail_for(struct rst_event *e, u64 now)
{
    struct masq_detail *addr = recent_detail(e->netns, e->ct_family, now);
    struct masq_detail *dev = recent_detail(e->netns, 0, now);
    if (addr) {
        u32 *a = (u32 *)addr->addr, *nat = (u32 *)e->ct_reply_daddr;
        if (a[0] == nat[0] && a[1] == nat[1] && a[2] == nat[2] && a[3] == nat[3])
            return addr;
    }
    if (addr && dev)
        return addr->ts > dev->ts ? addr : dev;
    return addr ? addr : dev;
}

// nf_ct_delete(ct, portid, report): every deletion of a confirmed entry. Only NATed TCP
// entries are reported (the others cannot cause the resets we attribute). Where the
// compiler split it (5.10: nf_ct_delete.part.0, called from inlined copies of the
// IPS_DYING test), the body is probed: the entry is then already marked dying.
int kp_ct_delete(struct pt_regs *ctx)
{
    u64 ct = PT_REGS_PARM1(ctx);
    u32 portid = PT_REGS_PARM2(ctx);
    u32 slot = CFG_DELETE_AFTER_DYING;
    u32 *after_dying = config.lookup(&slot);
    if (!ct || !after_dying)
        return 0;
    u32 status = rd32(ct + OFF_NF_CONN_STATUS);
    if (!(status & (IPS_SRC_NAT | IPS_DST_NAT)) || !(status & IPS_CONFIRMED))
        return 0;
    if (!*after_dying && (status & IPS_DYING))
        return 0;   // someone else is deleting it already
    if (!ct_is_tcp(ct))
        return 0;
    struct rst_event *e = event_reserve(KIND_CT_DELETE, PROBE_CT_DELETE);
    if (!e)
        return 0;
    fill_from_ct(e, ct);
    u64 now = bpf_ktime_get_ns();
    u32 zero = 0, tid = bpf_get_current_pid_tgid();
    u64 *ed = in_early_drop.lookup(&zero);
    u64 *walk = masq_walk.lookup(&tid);
    if (portid) {
        e->delete_reason = DEL_CTNETLINK;
        e->portid = portid;   // the requesting socket; the task is the requester
    } else if (ed && *ed && now - *ed < 1000000000ULL) {
        e->delete_reason = DEL_EARLY_DROP;
    } else if (walk && now - *walk < WALK_MAX_NS) {
        e->delete_reason = DEL_MASQUERADE;
        struct masq_detail *d = masq_detail_for(e, now);
        if (d) {
            if (!d->family)
                e->delete_reason = DEL_DEVICE;
            e->detail_ifindex = d->ifindex;
            e->detail_family = d->family;
            __builtin_memcpy(e->detail_addr, d->addr, 16);
            __builtin_memcpy(e->detail_ifname, d->ifname, 16);
        }
    } else if ((s32)(rd32(ct + OFF_NF_CONN_TIMEOUT) - (u32)bpf_jiffies64()) <= 0) {
        e->delete_reason = DEL_TIMEOUT;
    } else {
        e->delete_reason = DEL_OTHER;
    }
    event_submit(e);
    return 0;
}
