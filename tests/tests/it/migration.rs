//! Host migration: the API's refusals, the answers through the phases, and a service moved between two servers in
//! network namespaces while clients keep connecting to the old address and long connections stay open.

use std::{
    ffi::OsStr,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use hickory_proto::rr::RecordType;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::{
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    netns::{self, Namespaces},
    stack::Stack,
    system::{self, Process},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

const NAME: &str = "app.tether.test";
const OLD: &str = "198.18.1.2";
const NEW: &str = "198.18.2.2";
const WAIT: Duration = Duration::from_secs(20);

fn path(id: Option<i64>) -> String {
    match id {
        Some(id) => format!("/v1/domains/{NAME}/migrations/{id}"),
        None => format!("/v1/domains/{NAME}/migrations"),
    }
}

/// The name's addresses as a resolver gets them, sorted.
async fn answer(stack: &Stack) -> Result<Vec<String>> {
    Ok(sorted(addresses(&ask(stack.dns.dns_addr, NAME, RecordType::A, Transport::Udp).await?)))
}

async fn answers_become(stack: &Stack, expected: &[&str]) -> Result<()> {
    eventually(WAIT, &format!("{NAME} to answer {expected:?}"), || async {
        (answer(stack).await.ok()? == expected).then_some(())
    })
    .await
}

/// Waits until migration `id` is in `phase`, and returns it.
async fn phase_becomes(stack: &Stack, token: &str, id: i64, phase: &str) -> Result<Value> {
    eventually(WAIT, &format!("migration {id} to be {phase}"), || async {
        let (status, body) = stack.api.call(Method::GET, &path(Some(id)), Some(token), None).await.ok()?;
        (status == StatusCode::OK && body["phase"] == phase).then_some(body)
    })
    .await
}

/// Zone tether.test, subscriber acme with NAME (static address 198.18.7.1): OLD answered, NEW live at priority 1.
async fn setup() -> Result<(Stack, String)> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": NAME, "static_ip": "198.18.7.1" })).await?;
    stack.address(&token, NAME, json!({ "ip": OLD })).await?;
    stack.address(&token, NAME, json!({ "ip": NEW, "priority": 1 })).await?;
    answers_become(&stack, &[OLD]).await?;
    Ok((stack, token))
}

#[tokio::test]
async fn bad_migrations_are_refused_and_change_nothing() -> Result<()> {
    let (stack, acme) = setup().await?;
    stack.address(&acme, NAME, json!({ "ip": "198.18.3.2", "priority": 1 })).await?;
    let pool = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.3.2'").execute(&pool).await?;
    let globex = stack.subscriber("globex").await?;
    stack.domain(&globex, json!({ "name": "other.tether.test" })).await?;
    stack.address(&globex, "other.tether.test", json!({ "ip": "198.18.5.2" })).await?;

    let valid = json!({ "from": OLD, "to": NEW, "ports": [8080] });
    let with = |extra: Value| {
        let mut body = valid.clone();
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    };
    let cases = [
        (
            &acme,
            with(json!({ "to": "10.0.0.1" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "private or reserved space (10.0.0.0/8)",
        ),
        (&acme, with(json!({ "to": "169.254.1.1" })), StatusCode::UNPROCESSABLE_ENTITY, "private or reserved space"),
        (&acme, with(json!({ "to": "::ffff:192.168.1.1" })), StatusCode::UNPROCESSABLE_ENTITY, "192.168.0.0/16"),
        (&acme, with(json!({ "to": "fe80::1" })), StatusCode::UNPROCESSABLE_ENTITY, "fe80::/10"),
        (&acme, with(json!({ "to": "198.18.3.2" })), StatusCode::UNPROCESSABLE_ENTITY, "is dead, not live"),
        (&acme, with(json!({ "to": "198.18.5.2" })), StatusCode::UNPROCESSABLE_ENTITY, "is not an address of"),
        (&acme, with(json!({ "from": "198.18.9.9" })), StatusCode::UNPROCESSABLE_ENTITY, "from: 198.18.9.9 is not an"),
        (&acme, with(json!({ "to": OLD })), StatusCode::UNPROCESSABLE_ENTITY, "must differ"),
        (&acme, with(json!({ "to": "fd00::1" })), StatusCode::UNPROCESSABLE_ENTITY, "one address family"),
        (&acme, with(json!({ "temporary": "198.18.8.8" })), StatusCode::UNPROCESSABLE_ENTITY, "temporary:"),
        (&acme, with(json!({ "temporary": "10.1.1.1" })), StatusCode::UNPROCESSABLE_ENTITY, "private"),
        (&acme, with(json!({ "hold": 999_999_999 })), StatusCode::UNPROCESSABLE_ENTITY, "hold:"),
        (&acme, with(json!({ "quiet": 604_801 })), StatusCode::UNPROCESSABLE_ENTITY, "quiet:"),
        (&acme, with(json!({ "ports": [0] })), StatusCode::UNPROCESSABLE_ENTITY, "ports:"),
        (&acme, with(json!({ "ports": [] })), StatusCode::UNPROCESSABLE_ENTITY, "ports:"),
        (&acme, with(json!({ "ports": (1..=65).collect::<Vec<u16>>() })), StatusCode::UNPROCESSABLE_ENTITY, "ports:"),
        // No forwarded ports and no service tuples to take the default from.
        (&acme, json!({ "from": OLD, "to": NEW }), StatusCode::UNPROCESSABLE_ENTITY, "ports:"),
        (&globex, valid.clone(), StatusCode::FORBIDDEN, "another subscriber"),
    ];
    for (token, body, status, message) in cases {
        let (got, answer_body) = stack.api.call(Method::POST, &path(None), Some(token), Some(body.clone())).await?;
        assert_eq!(got, status, "{body}: {answer_body}");
        let text = answer_body["error"]["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{body}: {text:?} should say {message:?}");
    }
    let (status, body) = stack.api.call(Method::POST, &path(None), Some(&acme), Some(with(json!({ "to": 5 })))).await?;
    assert!(status.is_client_error(), "a mistyped field: {status} {body}");
    let (status, _) = stack
        .api
        .call(Method::POST, "/v1/domains/nosuch.tether.test/migrations", Some(&acme), Some(valid.clone()))
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = stack.api.call(Method::GET, &path(None), Some(&acme), None).await?;
    assert_eq!((status, body), (StatusCode::OK, json!([])), "nothing was stored");
    assert_eq!(answer(&stack).await?, [OLD], "the answers did not move");

    // One migration at a time; another tenant cannot see or delete it; deleting it rolls the answers back.
    let (status, created) = stack.api.call(Method::POST, &path(None), Some(&acme), Some(valid.clone())).await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().context("id")?;
    assert_eq!(created["phase"], "announced");
    answers_become(&stack, &[NEW]).await?;
    let (status, body) = stack.api.call(Method::POST, &path(None), Some(&acme), Some(valid.clone())).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap_or_default().contains("already has a migration under way"),
        "{body}"
    );
    for method in [Method::GET, Method::DELETE] {
        let (status, _) = stack.api.call(method, &path(Some(id)), Some(&globex), None).await?;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let (status, _) = stack.api.call(Method::GET, &format!("{}/x", path(None)), Some(&acme), None).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = stack.api.call(Method::DELETE, &path(Some(id)), Some(&acme), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    answers_become(&stack, &[OLD]).await?;
    let (status, _) = stack.api.call(Method::DELETE, &path(Some(id)), Some(&acme), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn the_answers_follow_the_phases() -> Result<()> {
    let (stack, token) = setup().await?;
    // With a temporary address (the static one) and no relay anywhere: temporary while announced, then the new one.
    let body = json!({ "from": OLD, "to": NEW, "temporary": "198.18.7.1", "hold": 2, "quiet": 0, "ports": [80] });
    let (status, created) = stack.api.call(Method::POST, &path(None), Some(&token), Some(body)).await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().context("id")?;
    assert_eq!((created["hold"].as_i64(), created["quiet"].as_i64()), (Some(2), Some(0)));
    answers_become(&stack, &["198.18.7.1"]).await?;
    let redirecting = phase_becomes(&stack, &token, id, "redirecting").await?;
    assert_eq!(redirecting["relay"], Value::Null, "no forwarder holds {OLD}");
    assert!(redirecting["done_after"].is_string(), "{redirecting}");
    answers_become(&stack, &[NEW]).await?;
    let done = phase_becomes(&stack, &token, id, "done").await?;
    let pool = stack.pg.pool().await?;
    let ordered: bool = sqlx::query_scalar(
        "SELECT created_at < redirect_at AND redirect_at < done_at FROM host_migrations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    ensure!(ordered, "the phases' times are in order: {done}");
    assert_eq!(done["flows"], 0);
    assert_eq!(answer(&stack).await?, [NEW], "a done migration keeps the old address out of the answers");

    // Migrating back needs the record gone; once it is, the old address answers again (its priority is better).
    let back = json!({ "from": NEW, "to": OLD, "ports": [80] });
    let (status, body) = stack.api.call(Method::POST, &path(None), Some(&token), Some(back)).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = stack.api.call(Method::DELETE, &path(Some(id)), Some(&token), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    answers_become(&stack, &[OLD]).await?;

    // Without a hold, the default is the configured factor (10) times the longest TTL served (1 s).
    let (status, created) = stack
        .api
        .call(Method::POST, &path(None), Some(&token), Some(json!({ "from": OLD, "to": NEW, "ports": [80] })))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!((created["hold"].as_i64(), created["quiet"].as_i64()), (Some(10), Some(300)));
    Ok(())
}

/// A runtime whose threads all live in one namespace: the sockets its tasks create are that namespace's.
struct InNamespace(Option<tokio::runtime::Runtime>);

impl InNamespace {
    fn new(ns: &Namespaces, short: &str) -> Result<Self> {
        let path = format!("/run/netns/{}", ns.name(short));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || netns::enter(&path).expect("entering the namespace"))
            .build()?;
        Ok(Self(Some(runtime)))
    }

    fn spawn<F: Future<Output = T> + Send + 'static, T: Send + 'static>(&self, f: F) -> tokio::task::JoinHandle<T> {
        self.0.as_ref().expect("running").spawn(f)
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A server greeting each connection with `<name>\n` and then echoing lines.
async fn serve(addr: SocketAddr, name: &'static str) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (read, mut write) = stream.split();
            if write.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A connection that has read its greeting.
struct Held {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl Held {
    async fn open(addr: SocketAddr) -> Result<(String, Self)> {
        let stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await??;
        let (read, write) = stream.into_split();
        let mut held = Self { lines: BufReader::new(read).lines(), write };
        let greeting = held.line().await?;
        Ok((greeting, held))
    }

    async fn line(&mut self) -> Result<String> {
        match tokio::time::timeout(Duration::from_secs(3), self.lines.next_line()).await?? {
            Some(line) => Ok(line),
            None => bail!("closed"),
        }
    }

    async fn echo(&mut self, text: &str) -> Result<()> {
        self.write.write_all(format!("{text}\n").as_bytes()).await?;
        let back = self.line().await?;
        ensure!(back == text, "echoed {back:?} for {text:?}");
        Ok(())
    }
}

/// One attempt of the resolver-like client that keeps the old answer: when, and the greeting or the error.
type Attempt = (Duration, Result<String, String>);

/// `client` ↔ `router` ↔ `old` (198.18.1.2, the forwarder beside the old server) and `new` (198.18.2.2).
fn network() -> Result<Namespaces> {
    let ns = Namespaces::create(&["client", "router", "old", "new"])?;
    for name in ["client", "router", "old", "new"] {
        system::sh(
            &ns,
            name,
            "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter",
        )?;
    }
    for (name, dev, peer, net) in [("client", "c0", "rc", 10), ("old", "o0", "ro", 1), ("new", "n0", "rn", 2)] {
        system::veth(&ns, (name, dev), ("router", peer))?;
        ns.ip(name, &["addr", "add", &format!("198.18.{net}.2/24"), "dev", dev])?;
        ns.ip("router", &["addr", "add", &format!("198.18.{net}.1/24"), "dev", peer])?;
        ns.ip(name, &["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
    }
    // The router routes; the old host forwards the flows it redirects.
    system::sh(&ns, "router", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    system::sh(&ns, "old", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    Ok(ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_moves_to_a_new_server_without_losing_a_connection() -> Result<()> {
    let ns = network()?;
    let (stack, token) = setup().await?;
    let (client, old_host, new_host) =
        (InNamespace::new(&ns, "client")?, InNamespace::new(&ns, "old")?, InNamespace::new(&ns, "new")?);
    let port = 8080;
    let old_addr = SocketAddr::new(OLD.parse()?, port);
    let _old_server = old_host.spawn(serve(old_addr, "old"));
    let _new_server = new_host.spawn(serve(SocketAddr::new(NEW.parse()?, port), "new"));

    // The forwarder on the old host: the relay of the migration.
    let bin = tokio::task::spawn_blocking(system::binaries).await??;
    let work = tempfile::tempdir()?;
    let config = work.path().join("forwarder.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = '{}'\nmetrics_listen = '127.0.0.1:0'\nmax_backoff = '500ms'\nrelay_name = 'old-site'\n",
            stack.pg.url()
        ),
    )?;
    let mut forwarder = Process::spawn(
        "packet-forwarder",
        &ns.name("old"),
        &bin.join("packet-forwarder"),
        &[OsStr::new("--config"), config.as_os_str()],
        &[("RUST_LOG", "info")],
        work.path().join("forwarder.log"),
    )?;

    let start = Instant::now();
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    let mut mark = |what: String| {
        eprintln!("{:>7.3}s  {what}", start.elapsed().as_secs_f64());
        timeline.push((start.elapsed(), what));
    };

    // Long connections, opened before the move.
    let mut long = Vec::new();
    for _ in 0..3 {
        let (greeting, held) = client.spawn(Held::open(old_addr)).await??;
        assert_eq!(greeting, "old");
        long.push(held);
    }

    // The client that keeps using the old answer: a new connection every 50 ms (at most 2,000).
    let stop = Arc::new(AtomicBool::new(false));
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let loop_task = client.spawn({
        let (stop, attempts) = (stop.clone(), attempts.clone());
        async move {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let result = Held::open(old_addr).await.map(|(greeting, _)| greeting).map_err(|e| e.to_string());
                attempts.lock().expect("attempts").push((start.elapsed(), result));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let greeted = |name: &'static str| {
        let attempts = attempts.clone();
        move || {
            let seen = attempts.lock().expect("attempts").iter().filter(|(_, r)| r.as_deref() == Ok(name)).count();
            std::future::ready((seen > 0).then_some(seen))
        }
    };
    eventually(WAIT, "the client to reach the old server three times", || {
        let seen = greeted("old");
        async move { seen().await.filter(|n| *n >= 3) }
    })
    .await?;
    forwarder.running()?;

    let body = json!({ "from": OLD, "to": NEW, "hold": 4, "quiet": 2, "ports": [port] });
    let (status, created) = stack.api.call(Method::POST, &path(None), Some(&token), Some(body)).await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().context("id")?;
    mark("migration posted: announced".into());

    let redirecting = phase_becomes(&stack, &token, id, "redirecting").await?;
    assert_eq!(redirecting["relay"], "old-site", "{redirecting}\n{}", forwarder.log_tail(20));
    assert_eq!(redirecting["relay_error"], Value::Null);
    mark(format!("redirecting (relay {})", redirecting["relay"]));
    answers_become(&stack, &[NEW]).await?;
    mark(format!("DNS answers {NEW}"));
    eventually(WAIT, "a new connection to the old address to reach the new server", greeted("new")).await?;
    mark("the old address's new connections reach the new server".into());
    for held in &mut long {
        held.echo("during the move").await?;
    }

    // The stale client moves on after a while; the migration ends after the hold and the quiet time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    loop_task.await?;
    mark("the stale client stops".into());
    let done = phase_becomes(&stack, &token, id, "done").await?;
    mark(format!("done: {} flows redirected, the last at {}", done["flows"], done["last_flow_at"]));

    let attempts = attempts.lock().expect("attempts").clone();
    let failed: Vec<&Attempt> = attempts.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "connection attempts failed: {failed:?}");
    let greetings: Vec<&str> = attempts.iter().filter_map(|(_, r)| r.as_deref().ok()).collect();
    let first_new = greetings.iter().position(|g| *g == "new").context("a redirected connection")?;
    assert!(greetings[first_new..].iter().all(|g| *g == "new"), "once redirected, always: {greetings:?}");
    let redirected = i64::try_from(greetings.len() - first_new)?;
    let flows = done["flows"].as_i64().context("flows")?;
    assert!(flows >= redirected, "the relay counted {flows} flows, the client saw {redirected} redirected");
    assert!(done["last_flow_at"].is_string(), "{done}");
    eprintln!("{} attempts, {} before the redirect, {redirected} redirected, none failed", attempts.len(), first_new);

    // After done the relay lets go: the old address is the old server's again, and the table is gone.
    eventually(WAIT, "the old address to be served by the old server again", || {
        let open = client.spawn(Held::open(old_addr));
        async move { (open.await.ok()?.ok()?.0 == "old").then_some(()) }
    })
    .await?;
    mark("the relay let go: the old address is the old server's".into());
    let table =
        system::run_in(&ns.name("old"), std::path::Path::new("nft"), &[OsStr::new("list"), OsStr::new("tables")])?;
    assert!(!table.contains("tether_migrate"), "{table}");
    for held in &mut long {
        held.echo("after the move").await?;
    }
    mark("the long connections opened before the move still echo".into());
    for line in ["redirecting new flows", "redirect released"] {
        let said = eventually(Duration::from_secs(5), &format!("the forwarder's log to say {line:?}"), || {
            let log = forwarder.log_tail(200);
            async move { log.contains(line).then_some(()) }
        })
        .await;
        assert!(said.is_ok(), "the forwarder's log should say {line:?}:\n{}", forwarder.log_tail(200));
    }
    forwarder.running()?;
    eprintln!("timeline:");
    for (at, what) in &timeline {
        eprintln!("  {:>7.3}s  {what}", at.as_secs_f64());
    }
    Ok(())
}

/// One HTTP/1.0 request to `ip`:8080 from the client namespace; the site's web server names the address it was
/// reached on.
async fn via(ip: &str) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect((ip, 8080)).await?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: shop.e2e.test\r\n\r\n").await?;
        let mut reply = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(3), exchange).await??;
    Ok(reply.rsplit("via ").next().context("no via line")?.trim().to_owned())
}

/// A site moving to a new uplink (a new ISP): the NCU on the site's router redirects new flows reaching the old
/// uplink address, as the heartbeat server tells it, and reports them; the whole system runs as real processes.
#[test]
fn a_site_moves_and_its_router_redirects_the_old_address() -> Result<()> {
    let ns = system::network(2)?;
    // The site's router routes (the system test's site only answers for itself).
    system::sh(&ns, "site", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    let runtime = system::client_runtime(&ns)?;
    runtime.block_on(async {
        let mut system = system::System::start(ns).await?;
        let result = site_moves(&mut system).await;
        if let Err(error) = &result {
            eprintln!("the site migration failed: {error:#}");
            system.print_logs();
        }
        result
    })
}

async fn site_moves(system: &mut system::System) -> Result<()> {
    let (old, new) = ("198.18.1.2", "198.18.2.2");
    eventually(Duration::from_secs(30), "both uplinks in DNS", || async {
        (system.answer().await.ok()? == [old, new]).then_some(())
    })
    .await?;
    assert_eq!(via(old).await?, old, "before the move the old uplink serves itself");
    let migrations = format!("/v1/domains/{}/migrations", system::DOMAIN);
    let body = json!({ "from": old, "to": new, "hold": 3, "quiet": 2 });
    let created = system.subscriber(Method::POST, &migrations, Some(body), StatusCode::CREATED).await?;
    assert_eq!(created["ports"], json!([8080]), "the forwarded ports by default");
    let one = format!("{migrations}/{}", created["id"]);

    let redirecting = eventually(WAIT, "the router to hold the redirect", || async {
        let body = system.subscriber(Method::GET, &one, None, StatusCode::OK).await.ok()?;
        (body["phase"] == "redirecting").then_some(body)
    })
    .await?;
    let relay = redirecting["relay"].as_str().unwrap_or_default();
    assert!(relay.starts_with("ncu "), "the NCU holds it: {redirecting}");
    assert_eq!(redirecting["relay_error"], Value::Null, "{redirecting}");
    eventually(WAIT, "DNS to answer the new uplink only", || async {
        (system.answer().await.ok()? == [new]).then_some(())
    })
    .await?;
    for _ in 0..5 {
        assert_eq!(via(old).await?, new, "a new connection to the old address is redirected by the router");
    }
    let done = eventually(WAIT, "the migration to be done", || async {
        let body = system.subscriber(Method::GET, &one, None, StatusCode::OK).await.ok()?;
        (body["phase"] == "done").then_some(body)
    })
    .await?;
    assert!(done["flows"].as_i64().unwrap_or(0) >= 5, "the NCU reported the redirected flows: {done}");
    assert_eq!(done["relay_error"], Value::Null);
    eventually(WAIT, "the router to let go of the old address", || async {
        (via(old).await.ok()? == old).then_some(())
    })
    .await?;
    let tables = system::run_in(
        &system.ns.name("site"),
        std::path::Path::new("nft"),
        &[OsStr::new("list"), OsStr::new("tables")],
    )?;
    assert!(!tables.contains("tether_migrate"), "{tables}");
    // The log lines follow the kernel's change by a moment: wait for them.
    for line in ["redirects from the heartbeat server", "redirecting new flows", "redirect released"] {
        let said = eventually(Duration::from_secs(5), &format!("ncu's log to say {line:?}"), || async {
            system.processes.iter().find(|p| p.name == "ncu")?.log_tail(300).contains(line).then_some(())
        })
        .await;
        assert!(said.is_ok(), "ncu's log should say {line:?}");
    }
    system.running()
}
