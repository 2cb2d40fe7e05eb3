//! Network layers: which process listens where, read from the kernel; and the tiers of the
//! hardened reference on separate network namespaces: the database and the image store on a
//! private network only the gateway's host is on, workers on another reaching the worker
//! listener and nothing else, clients reaching the public listener and nothing else.

use crate::support::{self, Service};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return inodes;
    };
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// A `/proc/net` address (`0100007F:1F90`): the kernel writes each 32-bit word of the
/// address in host order.
fn parse_address(hex: &str) -> Option<SocketAddr> {
    let (ip, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::V4(Ipv4Addr::from(w.to_be_bytes())),
        [a, b, c, d] => {
            let mut octets = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// What process `pid`'s sockets are doing: (TCP listening addresses, TCP connections, UDP
/// sockets), from `/proc/PID/net/*` joined with `/proc/PID/fd`.
fn sockets_of(pid: u32) -> (Vec<SocketAddr>, Vec<SocketAddr>, usize) {
    let mine = socket_inodes(pid);
    let mut listening = Vec::new();
    let (mut connected, mut udp) = (Vec::new(), 0);
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if !inode.parse().is_ok_and(|i: u64| mine.contains(&i)) {
                continue;
            }
            match (table.starts_with("udp"), *state) {
                (true, _) => udp += 1,
                (false, "0A") => listening.extend(parse_address(local)),
                (false, _) => connected.extend(parse_address(remote)),
            }
        }
    }
    (listening, connected, udp)
}

#[test]
fn proc_net_addresses_parse() {
    assert_eq!(
        parse_address("0100007F:1F90"),
        Some("127.0.0.1:8080".parse().expect("addr"))
    );
    assert_eq!(
        parse_address("00000000000000000000000001000000:01BB"),
        Some("[::1]:443".parse().expect("addr"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_listens_nowhere_and_metrics_listen_on_loopback_only() {
    let svc = Service::start(&[("SPARKLE_SCALER__MIN_WORKERS", "1")]).await;
    // A finished job shows the worker is up and working, not just started.
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a quiet harbour", "size": "64x64", "steps": 1}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id");
    svc.wait_for(id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    let workers = svc.worker_pids();
    assert!(!workers.is_empty(), "a worker runs");
    // Workers listen nowhere; what they are connected to is the control plane's loopback
    // worker listener, and only that.
    let mut control_plane = HashSet::new();
    for worker in workers {
        let (listening, connected, udp) = sockets_of(worker);
        assert_eq!(
            (listening.as_slice(), udp),
            (&[][..], 0),
            "worker {worker} listens"
        );
        control_plane.extend(connected);
    }
    let gateway: SocketAddr = svc
        .url
        .trim_start_matches("https://")
        .parse()
        .expect("addr");
    let metrics: SocketAddr = svc
        .metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("addr");
    let (mut listening, _, udp) = sockets_of(svc.pid());
    listening.sort();
    let loopback: Vec<SocketAddr> = listening
        .iter()
        .filter(|a| **a != gateway && **a != metrics)
        .copied()
        .collect();
    assert_eq!(loopback.len(), 1, "one worker listener: {listening:?}");
    assert!(loopback[0].ip().is_loopback(), "{loopback:?}");
    assert!(
        control_plane.iter().all(|a| *a == loopback[0]),
        "workers talk to the worker listener alone: {control_plane:?}"
    );
    let mut expected = vec![gateway, metrics, loopback[0]];
    expected.sort();
    assert_eq!(
        listening, expected,
        "the gateway, metrics, the worker listener"
    );
    assert!(metrics.ip().is_loopback(), "{metrics}");
    assert_eq!(udp, 0);
}

/// Network namespaces made for one test, removed (with the processes run in them, and the
/// servers started by the test scripts) on drop.
struct Namespaces {
    names: Vec<String>,
    children: Vec<Child>,
    /// (script, directory) of each server to stop.
    servers: Vec<(&'static str, std::path::PathBuf)>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for (script, dir) in &self.servers {
            let _ = Command::new("bash")
                .arg(script)
                .arg("stop")
                .arg(dir)
                .output();
        }
        for child in &mut self.children {
            support::kill(child.id(), "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for child in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A client in its own namespace: submits a job, waits for it, fetches the image, then
/// knocks on the gateway host's other ports and on the database and the store. Prints what
/// it found as JSON.
const CLIENT: &str = r#"
import json, socket, ssl, sys, time, urllib.request
url, cafile, key, admin_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
worker_host, worker_port = sys.argv[5].rsplit(":", 1)
private = sys.argv[6:]
ctx = ssl.create_default_context(cafile=cafile)
def call(method, path, body=None):
    req = urllib.request.Request(url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
        return r.status, r.read()
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "unreachable: %s" % e
out = {}
status, body = call("POST", "/v1/jobs", {"prompt": "a harbour at dusk", "size": "64x64", "steps": 2})
job = json.loads(body)
out["submitted"] = status
deadline = time.time() + 120
while job["status"] in ("queued", "running") and time.time() < deadline:
    time.sleep(0.2)
    job = json.loads(call("GET", "/v1/jobs/" + job["id"])[1])
out["status"] = job["status"]
if job["status"] == "succeeded":
    out["png"] = call("GET", "/v1/jobs/%s/images/0" % job["id"])[1][:8] == b"\x89PNG\r\n\x1a\n"
host = url.split("//")[1].rsplit(":", 1)[0]
out["admin_port_from_outside"] = reach(host, admin_port)
out["worker_port_from_client"] = reach(worker_host, int(worker_port))
out["private_from_client"] = [reach(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in private]
print(json.dumps(out))
"#;

/// Whether `host:port` answers a TCP connection from namespace `ns`: `open`, `refused` or
/// `unreachable: …`.
fn reach_from(ns: &str, addr: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c"])
        .arg(
            "import socket,sys\nh,p=sys.argv[1].rsplit(':',1)\ntry:\n socket.create_connection((h,int(p)),timeout=3).close(); print('open')\nexcept ConnectionRefusedError: print('refused')\nexcept OSError as e: print('unreachable: %s' % e)",
        )
        .arg(addr)
        .output()
        .expect("reach");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `sparkle ARGS…` run to its end in namespace `ns`: (success, stdout, stderr).
fn sparkle_in(ns: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_sparkle")])
        .args(args)
        .output()
        .expect("sparkle");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const POSTGRES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/postgres.sh");
const S3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/s3.sh");

/// Runs a test script in namespace `ns`, its server listening on `host`; the settings it
/// printed.
fn server_in(ns: &str, host: &str, args: &[&str]) -> std::collections::HashMap<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "bash"])
        .args(args)
        .env("SPARKLE_TEST_HOST", host)
        .output()
        .expect("a test script");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `host:port` of a URL such as `postgres://user@10.0.0.2:5432/db` or `https://10.0.0.2:9000`.
fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Starts `sparkle ARGS…` inside namespace `ns`.
fn spawn_in(ns: &str, args: &[&str], env: &[(&str, &str)], log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_sparkle")])
        .args(args)
        .env("SPARKLE_WORKER__DEVICE", "cpu")
        .env("SPARKLE_QUEUE__LEASE_TIMEOUT_SECS", "10")
        .env("SPARKLE_WORKER__HEARTBEAT_SECS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("ip netns exec")
}

#[test]
fn gateway_worker_and_client_on_separate_network_namespaces() {
    let tag = std::process::id();
    let (gw, wk, cl) = (
        format!("spk-gw-{tag}"),
        format!("spk-wk-{tag}"),
        format!("spk-cl-{tag}"),
    );
    if let Err(why) = ip(&["netns", "add", &gw]) {
        eprintln!(
            "skipped: `ip netns add` failed ({why}); this test needs root with CAP_NET_ADMIN"
        );
        return;
    }
    let mut net = Namespaces {
        names: vec![gw.clone()],
        children: Vec::new(),
        servers: Vec::new(),
    };
    let db = format!("spk-db-{tag}");
    for ns in [&wk, &cl, &db] {
        ip(&["netns", "add", ns]).expect("netns add");
        net.names.push(ns.clone());
    }
    // The gateway host shares one link with the client host (the public side), one with the
    // worker host (the workers' side) and one with the data host (the database and the image
    // store); no other two hosts share a link.
    let subnet = format!("10.231.{}", tag % 250);
    let worker_subnet = format!("10.232.{}", tag % 250);
    let data_subnet = format!("10.233.{}", tag % 250);
    let (gw_if, cl_if) = (format!("spkg{tag}"), format!("spkc{tag}"));
    let (gw_wk_if, wk_if) = (format!("spkv{tag}"), format!("spkw{tag}"));
    let (gw_db_if, db_if) = (format!("spkp{tag}"), format!("spkd{tag}"));
    let gw_ip = format!("{subnet}.1");
    let gw_worker_ip = format!("{worker_subnet}.1");
    let data_ip = format!("{data_subnet}.2");
    for step in [
        vec![
            "link", "add", &gw_db_if, "type", "veth", "peer", "name", &db_if,
        ],
        vec!["link", "set", &gw_db_if, "netns", &gw],
        vec!["link", "set", &db_if, "netns", &db],
        vec![
            "link", "add", &gw_if, "type", "veth", "peer", "name", &cl_if,
        ],
        vec!["link", "set", &gw_if, "netns", &gw],
        vec!["link", "set", &cl_if, "netns", &cl],
        vec![
            "link", "add", &gw_wk_if, "type", "veth", "peer", "name", &wk_if,
        ],
        vec!["link", "set", &gw_wk_if, "netns", &gw],
        vec!["link", "set", &wk_if, "netns", &wk],
    ] {
        ip(&step).expect("veth");
    }
    for (ns, dev, addr) in [
        (&gw, &gw_if, format!("{gw_ip}/24")),
        (&cl, &cl_if, format!("{subnet}.2/24")),
        (&gw, &gw_wk_if, format!("{gw_worker_ip}/24")),
        (&wk, &wk_if, format!("{worker_subnet}.2/24")),
        (&gw, &gw_db_if, format!("{data_subnet}.1/24")),
        (&db, &db_if, format!("{data_ip}/24")),
    ] {
        ip(&["-n", ns, "addr", "add", &addr, "dev", dev]).expect("addr");
        ip(&["-n", ns, "link", "set", dev, "up"]).expect("up");
    }
    for ns in [&gw, &wk, &cl, &db] {
        ip(&["-n", ns, "link", "set", "lo", "up"]).expect("lo");
    }

    // The data host: PostgreSQL and the S3 server, each listening on its private address.
    let dir = tempfile::tempdir().expect("tempdir");
    let python = std::env::var("OPENAI_CLIENT_PYTHON").expect(
        "OPENAI_CLIENT_PYTHON must name a python with moto[server] (scripts/test.sh makes one)",
    );
    let (pg_dir, s3_dir) = (dir.path().join("postgres"), dir.path().join("s3"));
    let pg_arg = pg_dir.to_str().expect("utf-8");
    let s3_arg = s3_dir.to_str().expect("utf-8");
    let database = server_in(&db, &data_ip, &[POSTGRES, "start", pg_arg]);
    net.servers.push((POSTGRES, pg_dir.clone()));
    let store = server_in(&db, &data_ip, &[S3, "start", s3_arg, &python]);
    net.servers.push((S3, s3_dir.clone()));
    let (db_addr, s3_addr) = (
        host_port(&database["TEST_PG_URL"]),
        host_port(&store["TEST_S3_ENDPOINT"]),
    );
    assert!(db_addr.starts_with(&data_ip) && s3_addr.starts_with(&data_ip));

    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8");
    let model = support::tiny_model().to_str().expect("utf-8");
    let log = dir.path().join("sparkle.log");
    // The schema, made from the gateway's host as the database's owner.
    let schema = format!("net_{tag}");
    let in_schema = |url: &str| format!("{url}?options=-c%20search_path%3D{schema}");
    let migrate = Command::new("ip")
        .args([
            "netns",
            "exec",
            &gw,
            env!("CARGO_BIN_EXE_sparkle"),
            "migrate",
        ])
        .args(["--data-dir", data_arg, "--database-url"])
        .arg(in_schema(&database["TEST_PG_URL"]))
        .arg("--password-file")
        .arg(&database["TEST_PG_PASSWORD_FILE"])
        .args(["--grant-to", "sparkle_app"])
        .env("SPARKLE_DATABASE__CA_FILE", &database["TEST_PG_CA_FILE"])
        .output()
        .expect("sparkle migrate");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let config = dir.path().join("sparkle.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\nca_file = \"{}\"\npassword_file = \"{}\"\n\n\
             [store]\nurl = \"s3://{}/net\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
             ca_file = \"{}\"\ncredentials_file = \"{}\"\n",
            in_schema(&database["TEST_PG_APP_URL"]),
            database["TEST_PG_CA_FILE"],
            database["TEST_PG_APP_PASSWORD_FILE"],
            store["TEST_S3_BUCKET"],
            store["TEST_S3_ENDPOINT"],
            store["TEST_S3_REGION"],
            store["TEST_S3_CA_FILE"],
            store["TEST_S3_CREDENTIALS_FILE"],
        ),
    )
    .expect("configuration");
    let config_arg = config.to_str().expect("utf-8");
    let listen = format!("{gw_ip}:0");
    let worker_listen = format!("{gw_worker_ip}:8444");
    let mut gateway = spawn_in(
        &gw,
        &[
            "gateway",
            "--data-dir",
            data_arg,
            "--config",
            config_arg,
            "--model",
            model,
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("SPARKLE_WORKER_LISTEN", worker_listen.as_str())],
        &log,
    );
    let lines = BufReader::new(gateway.stdout.take().expect("stdout"));
    net.children.push(gateway);
    let (mut url, mut key, mut admin_port) = (String::new(), String::new(), 0u16);
    for line in lines.lines().map_while(Result::ok) {
        if let Some(k) = line.strip_prefix("Admin API key (shown once; only its hash is stored): ")
        {
            key = k.trim().to_string();
        }
        if let Some(m) = line.strip_prefix("Metrics at ") {
            admin_port = support::port_of(m.trim().trim_end_matches("/metrics"));
        }
        if let Some(u) = line.strip_prefix("Sparkle is up at ") {
            url = u.trim().to_string();
            break;
        }
    }
    assert!(
        !url.is_empty() && !key.is_empty(),
        "the gateway did not start:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The worker's host holds its enrollment secret and the gateway's certificate, no more.
    let (ok, secret, err) = sparkle_in(
        &gw,
        &[
            "enrollment",
            "create",
            "--name",
            "namespaced",
            "--data-dir",
            data_arg,
            "--config",
            config_arg,
        ],
    );
    assert!(ok, "{err}");
    let worker_host = dir.path().join("worker-host");
    std::fs::create_dir_all(&worker_host).expect("worker host");
    let secret_file = worker_host.join("enrollment.secret");
    std::fs::write(&secret_file, secret).expect("secret");
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let cert = data.join("tls/cert.pem");
    let worker_cert = worker_host.join("ca.pem");
    std::fs::copy(&cert, &worker_cert).expect("copy the certificate");
    let control_plane = format!("https://{worker_listen}");
    let worker_data = worker_host.join("data");
    let worker = spawn_in(
        &wk,
        &[
            "worker",
            "--control-plane",
            &control_plane,
            "--enrollment-token-file",
            secret_file.to_str().expect("utf-8"),
            "--ca-file",
            worker_cert.to_str().expect("utf-8"),
            "--data-dir",
            worker_data.to_str().expect("utf-8"),
            "--model",
            model,
        ],
        &[],
        &log,
    );
    net.children.push(worker);

    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &cl,
            "python3",
            "-c",
            CLIENT,
            &url,
            cert.to_str().expect("utf-8"),
            &key,
        ])
        .arg(admin_port.to_string())
        .arg(&worker_listen)
        .args([&db_addr, &s3_addr])
        .output()
        .expect("client");
    let said = String::from_utf8_lossy(&out.stdout);
    let seen: Value = serde_json::from_str(said.trim()).unwrap_or_else(|_| {
        panic!(
            "client: {said}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    eprintln!("client saw {seen}");
    assert_eq!(seen["submitted"], 202, "{seen}");
    assert_eq!(
        seen["status"], "succeeded",
        "the worker, over the worker listener alone, did the job: {seen}"
    );
    assert_ne!(
        seen["worker_port_from_client"], "open",
        "the worker listener is not on the public side: {seen}"
    );
    assert_eq!(seen["png"], true, "{seen}");
    assert_eq!(
        seen["admin_port_from_outside"], "refused",
        "metrics stay on the gateway host's loopback: {seen}"
    );
    // From this test's own namespace, the gateway is not there at all.
    let port = support::port_of(&url);
    let addr: SocketAddr = format!("{gw_ip}:{port}").parse().expect("addr");
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err());
    let links = Command::new("ip")
        .args(["-n", &wk, "-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(
        links.lines().count(),
        2,
        "the worker host has loopback and its link to the gateway host: {links}"
    );
    // From the worker's host, the public listener is not there.
    let public = format!("{gw_ip}:{port}");
    let reach = Command::new("ip")
        .args(["netns", "exec", &wk, "python3", "-c"])
        .arg("import socket,sys\nh,p=sys.argv[1].rsplit(':',1)\ntry:\n socket.create_connection((h,int(p)),timeout=3).close(); print('open')\nexcept OSError as e: print('closed')")
        .arg(&public)
        .output()
        .expect("reach");
    assert_eq!(
        String::from_utf8_lossy(&reach.stdout).trim(),
        "closed",
        "workers reach the worker listener only"
    );
    assert!(
        !worker_data.join("sparkle.db").exists() && !worker_data.join("keyring").exists(),
        "nothing of the deployment on the worker's host"
    );
    // The database and the store: the gateway's host reaches them (the job's image is in the
    // bucket, its record in the database); the client's and the workers' hosts do not.
    let from_client = seen["private_from_client"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(from_client.len(), 2, "{seen}");
    assert!(
        from_client
            .iter()
            .all(|r| r.as_str().is_some_and(|r| r.starts_with("unreachable"))),
        "the database and the store from the client's host: {seen}"
    );
    for addr in [&db_addr, &s3_addr] {
        let from_worker = reach_from(&wk, addr);
        assert!(
            from_worker.starts_with("unreachable"),
            "{addr} from the worker's host: {from_worker}"
        );
        assert_eq!(
            reach_from(&gw, addr),
            "open",
            "{addr} from the gateway's host"
        );
    }
    assert!(
        !data.join("sparkle.db").exists(),
        "the queue is in PostgreSQL, not in the gateway's data directory"
    );
    let images = data.join("images");
    assert_eq!(
        std::fs::read_dir(&images).map(|d| d.count()).unwrap_or(0),
        0,
        "the images are in the bucket, not in {}",
        images.display()
    );
}
