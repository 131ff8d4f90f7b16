#!/usr/bin/env python3
"""Listeners and probes for Bulkhead's real-traffic tests, inside a pod's
network namespace.

  netprobe.py serve PORT/PROTO...      TCP accept, UDP echo, SCTP INIT -> INIT-ACK
  netprobe.py probe PROTO ADDR PORT    one connection attempt; prints allow/deny/eperm
  netprobe.py hold ADDR PORT SECONDS   a TCP connection that sends a byte every 50 ms
                                       and prints each outcome ("ok"/"cut") with the time

This kernel has no SCTP stack, so SCTP is spoken on raw sockets (protocol
132): the prober sends an INIT with a correct CRC32c, the responder answers
with an INIT-ACK. The datapath only needs well-formed SCTP headers.
"""
import errno, os, random, select, socket, struct, sys, threading, time

SCTP = 132


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def sctp_packet(sport, dport, vtag, chunk_type, body):
    chunk = struct.pack("!BBH", chunk_type, 0, 4 + len(body)) + body
    header = struct.pack("!HHII", sport, dport, vtag, 0)
    packet = header + chunk
    checksum = crc32c(packet)
    return header[:8] + struct.pack("<I", checksum) + chunk


def family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def sctp_payload(data, family):
    """Raw IPv4 sockets deliver the IP header too; IPv6 ones do not."""
    if family == socket.AF_INET:
        ihl = (data[0] & 0x0F) * 4
        return data[ihl:]
    return data


def serve(specs):
    threads = []
    for spec in specs:
        port, proto = spec.split("/")
        port = int(port)
        for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            if proto == "TCP":
                target = serve_tcp
            elif proto == "UDP":
                target = serve_udp
            else:
                continue
            t = threading.Thread(target=target, args=(family, any_addr, port), daemon=True)
            t.start()
            threads.append(t)
    sctp_ports = {int(s.split("/")[0]) for s in specs if s.endswith("/SCTP")}
    if sctp_ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            t = threading.Thread(target=serve_sctp, args=(family, sctp_ports), daemon=True)
            t.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def serve_tcp(family, addr, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=echo_stream, args=(conn,), daemon=True).start()


def echo_stream(conn):
    try:
        while True:
            data = conn.recv(4096)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def serve_udp(family, addr, port):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(4096)
        s.sendto(data, peer)


def serve_sctp(family, ports):
    s = socket.socket(family, socket.SOCK_RAW, SCTP)
    while True:
        data, peer = s.recvfrom(65535)
        payload = sctp_payload(data, family)
        if len(payload) < 16 + 4:
            continue
        sport, dport, _vtag = struct.unpack("!HHI", payload[:8])
        chunk_type = payload[12]
        if dport not in ports or chunk_type != 1:
            continue
        initiate_tag = struct.unpack("!I", payload[16:20])[0]
        cookie = struct.pack("!HH", 7, 8) + b"cook"
        body = struct.pack("!IIHHI", random.getrandbits(32), 65535, 1, 1, 1) + cookie
        reply = sctp_packet(dport, sport, initiate_tag, 2, body)
        s.sendto(reply, (peer[0], 0))


def probe(proto, addr, port, timeout):
    family = family_of(addr)
    try:
        if proto == "TCP":
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect((addr, port))
            s.sendall(b"x")
            if s.recv(1) != b"x":
                return "deny"
            return "allow"
        if proto == "UDP":
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(b"ping", (addr, port))
            data, _ = s.recvfrom(64)
            return "allow" if data == b"ping" else "deny"
        if proto == "SCTP":
            s = socket.socket(family, socket.SOCK_RAW, SCTP)
            sport = random.randint(20000, 60000)
            tag = random.getrandbits(32) or 1
            body = struct.pack("!IIHHI", tag, 65535, 1, 1, 1)
            s.sendto(sctp_packet(sport, port, 0, 1, body), (addr, 0))
            deadline = time.time() + timeout
            while time.time() < deadline:
                ready, _, _ = select.select([s], [], [], deadline - time.time())
                if not ready:
                    break
                data, _ = s.recvfrom(65535)
                payload = sctp_payload(data, family)
                if len(payload) >= 13:
                    rsport, rdport, vtag = struct.unpack("!HHI", payload[:8])
                    if rsport == port and rdport == sport and payload[12] == 2 and vtag == tag:
                        return "allow"
            return "deny"
    except socket.timeout:
        return "deny"
    except PermissionError:
        return "eperm"
    except OSError as e:
        if e.errno == errno.EPERM:
            return "eperm"
        if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT):
            return "deny"
        raise
    return "deny"


def hold(addr, port, seconds):
    """Keep one TCP connection busy; report each exchange as "ok|cut|closed
    MONOTONIC_SECONDS", so a caller can tell what happened after a moment."""
    s = socket.socket(family_of(addr), socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect((addr, port))
    s.settimeout(0.2)
    print("connected", flush=True)
    end = time.time() + seconds
    while time.time() < end:
        try:
            s.sendall(b"y")
            got = s.recv(64)
            status = "ok" if got else "closed"
        except (socket.timeout, OSError):
            status = "cut"
        print(f"{status} {time.monotonic():.3f}", flush=True)
        time.sleep(0.05)


def main():
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(sys.argv[2:])
    elif cmd == "probe":
        timeout = float(os.environ.get("PROBE_TIMEOUT", "1.0"))
        print(probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), timeout), flush=True)
    elif cmd == "hold":
        hold(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
