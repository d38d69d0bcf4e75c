//! The tokio driver against a tiny PCP responder on 127.0.0.1.

// Test helpers outside #[test] fns: a failed setup should abort loudly.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portkeep_client::{
    Client, ClientConfig, ClientError, EpochVerdict, RequestBuilder, RequestOptions,
    RetransmitParams,
};
use portkeep_proto::{
    CodePoints, OpData, PcpOption, Protocol, Request, Response, ResponseHeader, ResultCode,
};
use tokio::net::UdpSocket;

#[derive(Clone, Copy)]
enum Behaviour {
    /// Drop the first `n` requests, then answer with this result.
    DropThenAnswer(usize, ResultCode),
    /// Never answer.
    Silent,
}

/// Starts a responder; returns its address and the raw requests it saw.
async fn responder(behaviour: Behaviour) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let cp = CodePoints::default();
        let mut buf = [0u8; 2048];
        let mut epoch = 1000;
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let raw = buf[..n].to_vec();
            let count = {
                let mut l = log.lock().unwrap();
                l.push(raw.clone());
                l.len()
            };
            let Behaviour::DropThenAnswer(drop, result) = behaviour else {
                continue;
            };
            if count <= drop {
                continue;
            }
            let req = Request::parse(&raw, &cp).unwrap();
            let mut data = req.data.clone();
            if let OpData::Map(m) = &mut data {
                m.external_port = 40000 + m.internal_port % 1000;
                m.external_ip = "::ffff:198.51.100.7".parse().unwrap();
            }
            let options = req
                .options
                .iter()
                .filter(|o| matches!(o, PcpOption::CheckpointRequired))
                .cloned()
                .collect();
            let resp = Response {
                header: ResponseHeader {
                    result,
                    lifetime: if result == ResultCode::SUCCESS {
                        req.header.lifetime.min(3600)
                    } else {
                        1800
                    },
                    epoch,
                },
                data,
                options,
            };
            epoch += 1;
            // Junk first: the client must skip it and keep waiting.
            sock.send_to(&[0xde, 0xad, 0xbe, 0xef], from).await.unwrap();
            sock.send_to(&resp.to_bytes(&cp).unwrap(), from)
                .await
                .unwrap();
        }
    });
    (addr, seen)
}

fn fast_config() -> ClientConfig {
    // A short IRT keeps the test quick; the RFC's 3 s stays the default.
    ClientConfig {
        retransmit: RetransmitParams {
            irt: Duration::from_millis(40),
            ..RetransmitParams::default()
        },
        jitter_seed: Some(1),
        ..ClientConfig::default()
    }
}

fn bounded(ms: u64) -> RequestOptions {
    RequestOptions {
        max_duration: Some(Duration::from_millis(ms)),
        ..RequestOptions::default()
    }
}

#[tokio::test]
async fn rfc6887_s8_1_1_driver_retransmits_until_answered() {
    let (server, seen) = responder(Behaviour::DropThenAnswer(2, ResultCode::SUCCESS)).await;
    let client = Client::connect_with(server, fast_config()).await.unwrap();
    assert_eq!(
        client.client_ip(),
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    let nonce = [0x11; 12];
    let map = RequestBuilder::map(Protocol::TCP, 8080)
        .nonce(nonce)
        .lifetime(7200)
        .checkpoint_required();
    let reply = client.send(&map, bounded(5000)).await.unwrap();
    assert_eq!(reply.transmissions, 3);
    assert!(reply.is_success());
    assert_eq!(reply.nonce, Some(nonce));
    assert_eq!(
        reply.external(),
        Some("198.51.100.7:40080".parse().unwrap())
    );
    assert_eq!(reply.lifetime(), 3600);
    assert_eq!(reply.epoch(), 1000);
    assert_eq!(reply.epoch_verdict, EpochVerdict::First);
    assert!(reply.checkpoint_requested);
    assert!(reply.checkpoint_honoured());

    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    assert!(
        requests.iter().all(|r| *r == requests[0]),
        "same bytes, same nonce"
    );
    // RFC 6887 section 8.1: the client IP field is the socket's address,
    // IPv4-mapped.
    let req = Request::parse(&requests[0], &CodePoints::default()).unwrap();
    assert_eq!(
        req.header.client_ip,
        "::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap()
    );

    // A second exchange a moment later: the epoch advanced by 1 s in
    // well under a second, within the 2 s slack of section 8.5.
    let renew = RequestBuilder::map(Protocol::TCP, 8080).nonce(nonce);
    let reply = client.send(&renew, bounded(5000)).await.unwrap();
    assert_eq!(reply.epoch_verdict, EpochVerdict::Valid);
    assert!(!reply.checkpoint_requested);
    assert!(!reply.checkpoint_honoured());
}

#[tokio::test]
async fn rfc6887_s8_1_1_driver_gives_up_at_max_duration() {
    let (server, seen) = responder(Behaviour::Silent).await;
    let client = Client::connect_with(server, fast_config()).await.unwrap();
    let err = client
        .send(&RequestBuilder::map(Protocol::UDP, 53), bounded(300))
        .await
        .unwrap_err();
    let ClientError::Timeout {
        transmissions,
        elapsed,
        ..
    } = err
    else {
        panic!("expected a timeout, got {err}")
    };
    // Measured from the first transmission to the wake-up after MRD.
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(1000)).contains(&elapsed),
        "{elapsed:?}"
    );
    // 40 ms, 80 ms, 160 ms apart (+-10%): sent at about 0, 40, 120, 280 ms.
    assert!((3..=4).contains(&transmissions), "{transmissions}");
    assert_eq!(seen.lock().unwrap().len() as u32, transmissions);
    assert!(err
        .to_string()
        .starts_with("timeout: no response from PCP server"));
}

#[tokio::test]
async fn rfc6887_s7_4_error_result_is_a_client_error_with_its_lifetime() {
    let (server, _) = responder(Behaviour::DropThenAnswer(0, ResultCode::NOT_AUTHORIZED)).await;
    let client = Client::connect_with(server, fast_config()).await.unwrap();
    let err = client
        .send(
            &RequestBuilder::delete(Protocol::TCP, 8080, [1; 12]),
            bounded(2000),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "NOT_AUTHORIZED (result code 2), error lifetime 1800 s"
    );
    let reply = err.reply().unwrap();
    assert_eq!(reply.result(), ResultCode::NOT_AUTHORIZED);
    assert_eq!(reply.lifetime(), 1800);
}

#[tokio::test]
async fn rfc6887_s7_4_unknown_result_code_is_reported_not_dropped() {
    let (server, _) = responder(Behaviour::DropThenAnswer(0, ResultCode(77))).await;
    let client = Client::connect_with(server, fast_config()).await.unwrap();
    let err = client
        .send(&RequestBuilder::announce(), bounded(2000))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "UNKNOWN (result code 77), error lifetime 1800 s"
    );
}
