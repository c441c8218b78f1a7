// rst-tracer, tracepoint backend: kernels without kprobes.
//
// Struct offsets and enum values come from the running kernel's BTF, passed by the
// loader as -D defines (OFF_*, KIND_*, ...): the installed headers may belong to another
// kernel, and BCC's automatic field rewriting would then read wrong memory silently.
// No kernel header is included: the packet headers are declared in common.h.
#include "common.h"

// Drop reasons we attribute; everything else is filtered here so ordinary drops cost
// nothing in user space. Index = enum skb_drop_reason value, filled by the loader with a
// DROP_* (tracer/record.py: which lane, or only an unconfirmed SNATed SYN).
BPF_ARRAY(wanted_drop_reasons, u8, 256);

RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
    // (const struct sock *sk, const struct sk_buff *skb[, enum sk_rst_reason reason])
    // skb is the segment that drew the RST (NULL for an active reset from a socket)
    u32 reason = 0;
#if TCP_SEND_RESET_ARITY >= 3
    reason = ctx->args[2];
#endif
    return report_reset_sent(ctx->args[0], ctx->args[1], reason, 0);
}

RAW_TRACEPOINT_PROBE(tcp_receive_reset)
{
    // (struct sock *sk)
    return report_receive_reset(ctx->args[0], 0);
}

RAW_TRACEPOINT_PROBE(kfree_skb)
{
    // (struct sk_buff *skb, void *location, enum skb_drop_reason reason[, struct sock *rx_sk])
    u32 reason = ctx->args[2];
    u32 idx = reason;
    u8 *wanted = wanted_drop_reasons.lookup(&idx);
    if (!wanted || !*wanted)
        return 0;
    return report_drop(ctx->args[0], ctx->args[1], reason, 0, *wanted);
}

// Addresses of the masquerade notifiers (masq_inet_event, masq_inet6_event,
// masq_device_event): index 0..2, 0 when unknown. Filled (and refreshed, since nf_nat
// may be a module loaded later) by the loader from kallsyms.
BPF_ARRAY(masq_notifiers, u64, 3);

RAW_TRACEPOINT_PROBE(notifier_run)
{
    // (void *cb): every notifier callback of every chain runs through here: filter first
    u64 cb = ctx->args[0];
    int hit = 0;
#pragma unroll
    for (u32 i = 0; i < 3; i++) {
        u32 idx = i;
        u64 *addr = masq_notifiers.lookup(&idx);
        if (addr && *addr && *addr == cb)
            hit = 1;
    }
    if (!hit)
        return 0;
    struct rst_event *e = event_reserve(KIND_MASQ_NOTIFIER, 0);
    if (!e)
        return 0;
    e->notifier_cb = cb;
    // address and device notifiers run in the context of the task that changed the address
    e->netns = netns_of_task(bpf_get_current_task());
    event_submit(e);
    return 0;
}
