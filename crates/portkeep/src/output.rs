//! What the user sees: text lines or one JSON object on stdout, and one
//! `error:` line on stderr when the request did not succeed.

use portkeep_client::{result_name, ClientError, Reply};
use portkeep_proto::addr::from_wire;
use portkeep_proto::{CodePoints, PcpOption};
use serde::Serialize;

use crate::cli::Common;
use crate::exit;
use crate::run::Plan;

/// The JSON form of a reply.
#[derive(Debug, Serialize)]
struct JsonReply {
    server: String,
    result: &'static str,
    result_code: u8,
    opcode: String,
    external_ip: Option<String>,
    external_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<String>,
    lifetime: u32,
    epoch: u32,
    nonce: Option<String>,
    checkpoint_requested: bool,
    checkpoint_honoured: bool,
    options: Vec<JsonOption>,
    transmissions: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One option of the response.
#[derive(Debug, Serialize)]
struct JsonOption {
    code: u8,
    /// `null` for options this client does not know.
    name: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

/// The JSON form of a failure without a reply.
#[derive(Debug, Serialize)]
struct JsonFailure<'a> {
    server: String,
    error: &'a str,
    message: String,
    nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transmissions: Option<u32>,
}

fn option_json(o: &PcpOption, cp: &CodePoints) -> JsonOption {
    let code = o.code(cp);
    let value = match o {
        PcpOption::ThirdParty(ip) => Some(from_wire(*ip).to_string()),
        PcpOption::Filter(f) => {
            let ip = from_wire(f.remote_ip);
            let len = if ip.is_ipv4() {
                f.prefix_len.saturating_sub(96)
            } else {
                f.prefix_len
            };
            Some(format!("{ip}/{len}:{}", f.remote_port))
        }
        PcpOption::Description(d) => Some(d.clone()),
        PcpOption::Unknown { data, .. } => Some(hex::encode(data)),
        _ => None,
    };
    JsonOption {
        code: code.0,
        name: code.name(),
        value,
    }
}

fn nonce_hex(plan: &Plan) -> Option<String> {
    plan.builder.nonce_value().map(hex::encode)
}

fn to_json(common: &Common, plan: &Plan, reply: &Reply, error: Option<String>) -> JsonReply {
    let cp = CodePoints::default();
    JsonReply {
        server: common.server.to_string(),
        result: result_name(reply.result()),
        result_code: reply.result().0,
        opcode: reply.opcode_name(&cp),
        external_ip: reply.external_ip().map(|ip| ip.to_string()),
        external_port: reply.external_port(),
        remote: plan.remote.map(|r| r.to_string()),
        lifetime: reply.lifetime(),
        epoch: reply.epoch(),
        nonce: reply.nonce.map(hex::encode),
        checkpoint_requested: reply.checkpoint_requested,
        checkpoint_honoured: reply.checkpoint_honoured(),
        options: reply
            .response
            .options
            .iter()
            .map(|o| option_json(o, &cp))
            .collect(),
        transmissions: reply.transmissions,
        error,
    }
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

fn print_human(plan: &Plan, reply: &Reply) {
    let cp = CodePoints::default();
    println!(
        "result: {} ({})",
        result_name(reply.result()),
        reply.result().0
    );
    println!("opcode: {}", reply.opcode_name(&cp));
    if reply.is_success() {
        match reply.external() {
            Some(ext) => println!("external: {ext}"),
            None if reply.external_port().is_some() => {
                println!(
                    "external: unspecified:{}",
                    reply.external_port().unwrap_or(0)
                )
            }
            None => {}
        }
        if let Some(r) = plan.remote {
            println!("remote: {r}");
        }
        println!("lifetime: {} s", reply.lifetime());
    } else {
        println!("error lifetime: {} s", reply.lifetime());
    }
    println!("epoch: {}", reply.epoch());
    if let Some(n) = reply.nonce {
        println!("nonce: {}", hex::encode(n));
    }
    if reply.nonce.is_some() {
        let honoured = match (reply.checkpoint_requested, reply.checkpoint_honoured()) {
            (false, _) => "no (not requested)",
            (true, true) => "yes",
            // RFC 7767 section 3.2: no echo means not protected, whatever
            // the reason (unsupported, policy, quota, rate, no backup).
            (true, false) => "no (not echoed: the mapping is not check-pointed)",
        };
        println!("checkpoint honoured: {honoured}");
    }
    for o in &reply.response.options {
        let j = option_json(o, &cp);
        let name = j
            .name
            .map_or_else(|| format!("unknown {}", j.code), str::to_owned);
        match j.value {
            Some(v) => println!("option: {name} {v}"),
            None => println!("option: {name}"),
        }
    }
}

/// Prints the outcome and returns the exit status.
pub(crate) fn report(common: &Common, plan: &Plan, result: &Result<Reply, ClientError>) -> u8 {
    let err = match result {
        Ok(reply) => {
            if common.json {
                print_json(&to_json(common, plan, reply, None));
            } else {
                print_human(plan, reply);
            }
            return exit::SUCCESS;
        }
        Err(e) => e,
    };
    let message = err.to_string();
    let (status, kind) = match err {
        ClientError::Pcp { reply } => {
            if common.json {
                print_json(&to_json(common, plan, reply, Some(message.clone())));
            } else {
                print_human(plan, reply);
            }
            eprintln!("error: {message}");
            if reply.result() == portkeep_proto::ResultCode::NOT_AUTHORIZED
                && plan.builder.nonce_value().is_some()
            {
                // RFC 6887 section 11.3: the mapping exists under another
                // nonce.
                eprintln!(
                    "hint: the server holds this mapping under another nonce: it was made by \
                     another client, with another key file (--key-file), or with --nonce; renew \
                     or delete it with the nonce it was made with (--nonce), or let it expire"
                );
            }
            return exit::PCP_ERROR;
        }
        ClientError::Timeout { .. } => (exit::TIMEOUT, "timeout"),
        ClientError::Build(_) | ClientError::Encode(_) => (exit::USAGE, "usage"),
        _ => (exit::FAILURE, "io"),
    };
    let transmissions = match err {
        ClientError::Timeout { transmissions, .. } => Some(*transmissions),
        _ => None,
    };
    if common.json {
        print_json(&JsonFailure {
            server: common.server.to_string(),
            error: kind,
            message: message.clone(),
            nonce: nonce_hex(plan),
            transmissions,
        });
    } else if let Some(n) = nonce_hex(plan) {
        // The server may have created the mapping and lost only the
        // answer: the nonce lets a later run renew or delete it.
        println!("nonce: {n}");
    }
    eprintln!("error: {message}");
    status
}
