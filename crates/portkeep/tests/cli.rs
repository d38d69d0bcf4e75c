//! The real `portkeep` binary against a fake PCP responder on loopback.

// Test helpers outside #[test] fns: a failed setup should abort loudly.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use portkeep_proto::{
    CodePoints, OpData, OptionCode, PcpOption, Request, Response, ResponseHeader, ResultCode,
};

const BIN: &str = env!("CARGO_BIN_EXE_portkeep");
const NONCE: &str = "00112233445566778899aabb";

#[derive(Clone, Copy)]
enum Behaviour {
    /// SUCCESS: external 198.51.100.7, port internal+40000 (mod), lifetime
    /// min(asked, 3600), epoch 1000, CHECKPOINT_REQUIRED echoed if asked.
    Success,
    /// This result code with error lifetime 1800.
    Error(ResultCode),
    /// SUCCESS plus an unknown optional option (code 200).
    SuccessWithUnknownOption,
    /// Never answer.
    Silent,
}

struct Responder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Responder {
    fn start(behaviour: Behaviour) -> Responder {
        Self::start_on("127.0.0.1:0", behaviour).unwrap()
    }

    fn start_on(bind: &str, behaviour: Behaviour) -> std::io::Result<Responder> {
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let cp = CodePoints::default();
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let req = Request::parse(&buf[..n], &cp).unwrap();
                log.lock().unwrap().push(req.clone());
                let Some(resp) = answer(&req, behaviour) else {
                    continue;
                };
                sock.send_to(&resp.to_bytes(&cp).unwrap(), from).unwrap();
            }
        });
        Ok(Responder {
            addr,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(req: &Request, behaviour: Behaviour) -> Option<Response> {
    let mut data = req.data.clone();
    let (result, lifetime) = match behaviour {
        Behaviour::Silent => return None,
        Behaviour::Error(rc) => (rc, 1800),
        Behaviour::Success | Behaviour::SuccessWithUnknownOption => {
            match &mut data {
                OpData::Map(m) => {
                    m.external_port = 40000 + m.internal_port % 10000;
                    m.external_ip = "::ffff:198.51.100.7".parse().unwrap();
                }
                OpData::Peer(p) => {
                    p.map.external_port = 40000 + p.map.internal_port % 10000;
                    p.map.external_ip = "::ffff:198.51.100.7".parse().unwrap();
                }
                _ => {}
            }
            (ResultCode::SUCCESS, req.header.lifetime.min(3600))
        }
    };
    let mut options: Vec<PcpOption> = if result == ResultCode::SUCCESS {
        // RFC 7767 section 3.2: echo CHECKPOINT_REQUIRED when honoured.
        req.options
            .iter()
            .filter(|o| matches!(o, PcpOption::CheckpointRequired))
            .cloned()
            .collect()
    } else {
        // RFC 6887 section 8.3: an error response copies the request.
        req.options.clone()
    };
    if let Behaviour::SuccessWithUnknownOption = behaviour {
        options.push(PcpOption::Unknown {
            code: OptionCode(200),
            data: vec![0xca, 0xfe],
        });
    }
    Some(Response {
        header: ResponseHeader {
            result,
            lifetime,
            epoch: 1000,
        },
        data,
        options,
    })
}

fn portkeep(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", text(&out.stdout)))
}

#[test]
fn rfc6887_s11_map_success_human_output() {
    let r = Responder::start(Behaviour::Success);
    let server = r.addr.to_string();
    let out = portkeep(&[
        "map",
        "tcp",
        "8080",
        "--server",
        &server,
        "--nonce",
        NONCE,
        "--checkpoint",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "result: SUCCESS (0)",
        "opcode: MAP",
        "external: 198.51.100.7:48080",
        "lifetime: 3600 s",
        "epoch: 1000",
        "nonce: 00112233445566778899aabb",
        "checkpoint honoured: yes",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{stdout}");
    }
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let reqs = r.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header.lifetime, 7200, "default lifetime");
    assert_eq!(
        reqs[0].header.client_ip,
        "::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(reqs[0].options, vec![PcpOption::CheckpointRequired]);
}

#[test]
fn rfc7767_s3_2_checkpoint_not_requested_is_reported_as_no() {
    let r = Responder::start(Behaviour::Success);
    let out = portkeep(&["map", "udp", "5353", "--server", &r.addr.to_string()]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("checkpoint honoured: no (not requested)\n"),
        "{stdout}"
    );
    // A random nonce is generated and printed.
    let nonce = stdout
        .lines()
        .find_map(|l| l.strip_prefix("nonce: "))
        .expect("nonce line");
    assert_eq!(nonce.len(), 24);
    let sent = r.requests()[0].data.map_part().unwrap().nonce;
    assert_eq!(nonce, hex::encode(sent));
}

#[test]
fn rfc6887_s11_map_success_json_output() {
    let r = Responder::start(Behaviour::Success);
    let out = portkeep(&[
        "--json",
        "map",
        "tcp",
        "8080",
        "--server",
        &r.addr.to_string(),
        "--nonce",
        NONCE,
        "--checkpoint",
        "--lifetime",
        "600",
        "--suggest",
        "198.51.100.7:48080",
        "--prefer-failure",
        "--filter",
        "203.0.113.0/24:443",
        "--filter",
        "2001:db8::/32",
        "--description",
        "web server",
        "--third-party",
        "192.0.2.44",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["result"], "SUCCESS");
    assert_eq!(v["result_code"], 0);
    assert_eq!(v["opcode"], "MAP");
    assert_eq!(v["external_ip"], "198.51.100.7");
    assert_eq!(v["external_port"], 48080);
    assert_eq!(v["lifetime"], 600);
    assert_eq!(v["epoch"], 1000);
    assert_eq!(v["nonce"], NONCE);
    assert_eq!(v["checkpoint_requested"], true);
    assert_eq!(v["checkpoint_honoured"], true);
    assert_eq!(v["options"][0]["code"], 192);
    assert_eq!(v["options"][0]["name"], "CHECKPOINT_REQUIRED");

    // What went on the wire (RFC 6887 sections 11.1 and 13).
    let req = &r.requests()[0];
    let m = req.data.map_part().unwrap();
    assert_eq!(m.external_port, 48080);
    assert_eq!(
        m.external_ip,
        "::ffff:198.51.100.7".parse::<std::net::Ipv6Addr>().unwrap()
    );
    let has = |o: &PcpOption| req.options.contains(o);
    assert!(has(&PcpOption::PreferFailure));
    assert!(has(&PcpOption::Description("web server".into())));
    assert!(has(&PcpOption::ThirdParty(
        "::ffff:192.0.2.44".parse().unwrap()
    )));
    let filters: Vec<_> = req
        .options
        .iter()
        .filter_map(|o| match o {
            PcpOption::Filter(f) => Some((f.prefix_len, f.remote_port)),
            _ => None,
        })
        .collect();
    assert_eq!(filters, vec![(120, 443), (32, 0)], "IPv4 lengths +96");
}

#[test]
fn rfc6887_s12_peer_json_output() {
    let r = Responder::start(Behaviour::Success);
    let out = portkeep(&[
        "peer",
        "udp",
        "5000",
        "203.0.113.9:3478",
        "--server",
        &r.addr.to_string(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["opcode"], "PEER");
    assert_eq!(v["external_port"], 45000);
    assert_eq!(v["remote"], "203.0.113.9:3478");
    let OpData::Peer(p) = &r.requests()[0].data else {
        panic!("not a PEER request")
    };
    assert_eq!(p.remote_port, 3478);
}

#[test]
fn rfc6887_s15_delete_sends_lifetime_zero_with_the_nonce() {
    let r = Responder::start(Behaviour::Success);
    let out = portkeep(&[
        "delete",
        "tcp",
        "8080",
        "--nonce",
        NONCE,
        "--server",
        &r.addr.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let req = &r.requests()[0];
    assert_eq!(req.header.lifetime, 0);
    assert_eq!(hex::encode(req.data.map_part().unwrap().nonce), NONCE);
}

#[test]
fn rfc6887_s14_1_announce_reports_the_epoch() {
    let r = Responder::start(Behaviour::Success);
    let out = portkeep(&["announce", "--server", &r.addr.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["opcode"], "ANNOUNCE");
    assert_eq!(v["epoch"], 1000);
    assert_eq!(v["nonce"], serde_json::Value::Null);
    assert_eq!(r.requests()[0].data, OpData::Announce);
}

#[test]
fn rfc6887_s7_4_pcp_error_exits_2_and_names_the_result() {
    let r = Responder::start(Behaviour::Error(ResultCode::NOT_AUTHORIZED));
    let server = r.addr.to_string();
    let out = portkeep(&[
        "delete", "tcp", "8080", "--nonce", NONCE, "--server", &server,
    ]);
    assert_eq!(out.status.code(), Some(2));
    // RFC 6887 section 11.3: the mapping exists under another nonce; the
    // CLI says so and how to fix it.
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: NOT_AUTHORIZED (result code 2), error lifetime 1800 s\nhint: "),
        "{stderr}"
    );
    assert!(stderr.contains("another nonce"), "{stderr}");
    assert!(text(&out.stdout).contains("result: NOT_AUTHORIZED (2)\n"));

    let out = portkeep(&[
        "delete", "tcp", "8080", "--nonce", NONCE, "--server", &server, "--json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let v = json(&out);
    assert_eq!(v["result"], "NOT_AUTHORIZED");
    assert_eq!(v["result_code"], 2);
    assert_eq!(v["lifetime"], 1800);
}

#[test]
fn rfc6887_s7_unknown_result_and_option_are_reported() {
    let r = Responder::start(Behaviour::Error(ResultCode(99)));
    let out = portkeep(&["map", "tcp", "1", "--server", &r.addr.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["result"], "UNKNOWN");
    assert_eq!(json(&out)["result_code"], 99);
    assert!(text(&out.stderr).contains("UNKNOWN (result code 99)"));

    let r = Responder::start(Behaviour::SuccessWithUnknownOption);
    let out = portkeep(&["map", "tcp", "1", "--server", &r.addr.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    assert_eq!(v["options"][0]["code"], 200);
    assert_eq!(v["options"][0]["name"], serde_json::Value::Null);
    assert_eq!(v["options"][0]["value"], "cafe");
}

#[test]
fn rfc6887_s8_1_1_timeout_exits_3() {
    let r = Responder::start(Behaviour::Silent);
    let out = portkeep(&[
        "map",
        "tcp",
        "8080",
        "--server",
        &r.addr.to_string(),
        "--timeout",
        "0.5",
        "--nonce",
        NONCE,
    ]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: timeout: no response from PCP server"),
        "{stderr}"
    );
    // The nonce is still printed: the server may hold the mapping.
    assert_eq!(text(&out.stdout), format!("nonce: {NONCE}\n"));
    assert_eq!(
        r.requests().len(),
        1,
        "0.5 s is before the first retransmission"
    );

    let out = portkeep(&[
        "announce",
        "--server",
        &r.addr.to_string(),
        "--timeout",
        "0.2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json(&out)["error"], "timeout");
}

#[test]
fn rfc6887_s19_1_ipv6_server_address() {
    let Ok(r) = Responder::start_on("[::1]:0", Behaviour::Success) else {
        portkeep_test_support::skip::skip("IPv6 server address", "no IPv6 loopback");
        return;
    };
    let out = portkeep(&[
        "map",
        "tcp",
        "80",
        "--server",
        &r.addr.to_string(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        r.requests()[0].header.client_ip,
        "::1".parse::<std::net::Ipv6Addr>().unwrap()
    );
}

#[test]
fn bad_arguments_exit_64_and_name_the_argument() {
    let cases: &[(&[&str], &str)] = &[
        (&["map", "tcpx", "80"], "<PROTO>"),
        (&["map", "tcp", "70000"], "<INTERNAL_PORT>"),
        (&["map", "all", "80"], "<INTERNAL_PORT>"),
        (&["map", "tcp", "80", "--nonce", "xyz"], "--nonce"),
        (
            &["map", "tcp", "80", "--nonce", "0011223344556677889zaabb"],
            "--nonce",
        ),
        (&["delete", "tcp", "80", "--nonce", "001122"], "--nonce"),
        (
            &["map", "tcp", "80", "--server", "not-an-address"],
            "--server",
        ),
        (
            &["map", "tcp", "80", "--server", "1.2.3.4:99999"],
            "--server",
        ),
        (&["map", "tcp", "80", "--timeout", "-1"], "--timeout"),
        (&["map", "tcp", "80", "--lifetime", "-1"], "--lifetime"),
        (&["map", "tcp", "80", "--filter", "10.0.0.0/33"], "--filter"),
        (&["map", "tcp", "80", "--suggest", "x:y"], "--suggest"),
        (
            &["map", "tcp", "80", "--third-party", "nope"],
            "--third-party",
        ),
        (&["peer", "tcp", "80", "203.0.113.1"], "<REMOTE_IP:PORT>"),
        (&["peer", "tcp", "80", "203.0.113.1:0"], "<REMOTE_IP:PORT>"),
        (&["peer", "tcp", "0", "203.0.113.1:1"], "<INTERNAL_PORT>"),
        (
            &["peer", "tcp", "80", "203.0.113.1:1", "--prefer-failure"],
            "--prefer-failure",
        ),
        (&["bogus"], "bogus"),
        (&[], "Usage"),
    ];
    for (args, named) in cases {
        let out = portkeep(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?} should name {named}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let long = "x".repeat(1100);
    let out = portkeep(&["map", "tcp", "80", "--description", &long]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("--description"));
}

#[test]
fn help_and_version_exit_0() {
    assert_eq!(portkeep(&["--help"]).status.code(), Some(0));
    assert_eq!(portkeep(&["map", "--help"]).status.code(), Some(0));
    assert_eq!(portkeep(&["--version"]).status.code(), Some(0));
}
