//! The web page in a real browser: headless Chromium from the system's packages, driven over
//! WebDriver by chromedriver (scripts/test.sh installs both). A person signs in (after a bad
//! key, shown as the API words it), makes an image with the tiny model and watches it to the
//! end, finds it in the gallery, cancels a second job and signs out, which ends the session
//! on the server. Screenshots of each stage are saved under the test target directory.

use crate::support::Service;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "chromedriver";

/// chromedriver on a free loopback port, stopped on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver() -> Driver {
    let port = crate::support::fixed_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{CHROMEDRIVER} cannot start ({e}): the browser test needs Debian's chromium and \
                 chromium-driver, which scripts/test.sh installs"
            )
        });
    Driver(child, port)
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium"
    );
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
                // The service's self-signed development certificate.
                "--ignore-certificate-errors",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // chromedriver is spoken to over plain HTTP on loopback.
        let connected = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await;
        match connected {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no browser session: {e}"),
        }
    }
}

/// Saves what the browser shows now as `NN-name.png`.
async fn screenshot(client: &Client, shots: &std::path::Path, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(shots.join(format!("{name}.png")), png).expect("save screenshot");
}

/// The value of a script, evaluated in the page.
async fn eval(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.expect("script")
}

/// Waits until `script` is truthy in the page.
async fn until(client: &Client, what: &str, script: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let value = eval(client, script).await;
        if value.as_bool() == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened ({script})"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn fill(client: &Client, id: &str, text: &str) {
    let field = client.find(Locator::Id(id)).await.expect(id);
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_makes_an_image_watches_it_cancels_one_and_signs_out() {
    let svc = Service::start(&[]).await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).expect("screenshot directory");
    let profile = tempfile::tempdir().expect("profile");
    let driver = start_driver();
    let client = browser(&driver, profile.path()).await;

    // A bad key is refused in the API's words.
    client
        .goto(&format!("{}/", svc.url))
        .await
        .expect("open the page");
    until(
        &client,
        "the sign-in form",
        "return !document.getElementById('signin').hidden",
        Duration::from_secs(15),
    )
    .await;
    fill(&client, "api-key", "spk_not_a_real_key").await;
    click(&client, "#signin-form button[type=submit]").await;
    until(
        &client,
        "the refusal",
        "return !document.getElementById('signin-error').hidden",
        Duration::from_secs(10),
    )
    .await;
    let refusal = client
        .find(Locator::Id("signin-error"))
        .await
        .expect("error")
        .text()
        .await
        .expect("text");
    assert_eq!(refusal, "the API key is not valid (invalid_api_key)");
    screenshot(&client, &shots, "1-bad-key").await;

    // Signed in: the page holds a session cookie it cannot read, never the key.
    fill(&client, "api-key", &svc.admin_key).await;
    click(&client, "#signin-form button[type=submit]").await;
    until(
        &client,
        "the signed-in page",
        "return !document.getElementById('app').hidden",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        eval(&client, "return document.cookie").await,
        json!(""),
        "HttpOnly"
    );
    let page_text = eval(&client, "return document.documentElement.outerHTML + JSON.stringify(localStorage) + JSON.stringify(sessionStorage)").await;
    assert!(
        !page_text.to_string().contains(&svc.admin_key),
        "the key is not kept"
    );
    let cookies = client.get_all_cookies().await.expect("cookies");
    let session = cookies
        .iter()
        .find(|c| c.name() == "__Host-sparkle_session")
        .expect("the session cookie")
        .value()
        .to_string();
    until(
        &client,
        "the models",
        "return document.getElementById('model').options.length > 0",
        Duration::from_secs(10),
    )
    .await;

    // An image, followed to its end: the live card shows each step, then the gallery has it.
    fill(&client, "prompt", "a lighthouse at dusk").await;
    fill(&client, "steps", "4").await;
    fill(&client, "seed", "7").await;
    click(&client, "#go").await;
    until(
        &client,
        "the live card",
        "return document.querySelector('#live .card') !== null",
        Duration::from_secs(10),
    )
    .await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = eval(&client, "const c = document.querySelector('#live .card'); \
            return c ? [c.querySelector('.status').textContent, Number(c.querySelector('progress').value), Number(c.querySelector('progress').max)] : null").await;
        if state.is_null() {
            break;
        }
        if seen.last() != Some(&state) {
            if seen.len() == 2 {
                screenshot(&client, &shots, "2-in-progress").await;
            }
            seen.push(state);
        }
        assert!(
            Instant::now() < deadline,
            "the job never finished: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steps: Vec<(i64, i64)> = seen
        .iter()
        .filter_map(|s| Some((s[1].as_f64()? as i64, s[2].as_f64()? as i64)))
        .filter(|(_, max)| *max == 4)
        .collect();
    assert!(
        steps.len() >= 2,
        "progress was shown step by step: {seen:?}"
    );
    assert!(
        steps.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress only moves on: {seen:?}"
    );
    until(
        &client,
        "the image in the gallery",
        "const img = document.querySelector('#gallery .card img'); \
        return img !== null && img.complete && img.naturalWidth > 0",
        Duration::from_secs(15),
    )
    .await;
    let caption = eval(
        &client,
        "return document.querySelector('#gallery .card .params').textContent",
    )
    .await;
    assert!(
        caption
            .as_str()
            .is_some_and(|c| c.contains("4 steps") && c.contains("seed 7")),
        "{caption}"
    );
    screenshot(&client, &shots, "3-gallery").await;

    // "Use these settings" fills the form back in.
    fill(&client, "prompt", "").await;
    click(&client, "#gallery .card .actions button").await;
    assert_eq!(
        eval(&client, "return document.getElementById('prompt').value").await,
        json!("a lighthouse at dusk")
    );
    assert_eq!(
        eval(&client, "return document.getElementById('seed').value").await,
        json!("7")
    );

    // A second job, cancelled while it is live.
    fill(&client, "steps", "150").await;
    fill(&client, "n", "4").await;
    click(&client, "#go").await;
    until(
        &client,
        "the second live card",
        "return document.querySelector('#live .card button') !== null",
        Duration::from_secs(10),
    )
    .await;
    click(&client, "#live .card button").await;
    until(
        &client,
        "the cancellation",
        "const c = document.querySelector('#live .card'); \
        return c !== null && c.dataset.status === 'cancelled'",
        Duration::from_secs(15),
    )
    .await;
    let shown = eval(
        &client,
        "return document.querySelector('#live .card .status').textContent",
    )
    .await;
    assert_eq!(shown, json!("Cancelled"));
    let cancelled_id = eval(
        &client,
        "return document.querySelector('#live .card').dataset.job",
    )
    .await;
    let job = svc
        .get_json(
            &format!("/v1/jobs/{}", cancelled_id.as_str().expect("id")),
            &svc.admin_key,
        )
        .await;
    assert_eq!(job["status"], "cancelled");
    screenshot(&client, &shots, "4-cancelled").await;
    // Once its stream says it is over, the card can be dismissed.
    until(
        &client,
        "the dismiss button",
        "const b = document.querySelector('#live .card .actions button'); \
         return b !== null && b.textContent === 'Dismiss'",
        Duration::from_secs(15),
    )
    .await;
    click(&client, "#live .card .actions button").await;
    until(
        &client,
        "the card gone",
        "return document.querySelector('#live .card') === null",
        Duration::from_secs(5),
    )
    .await;

    // Signing out ends the session on the server: its cookie opens nothing any more.
    click(&client, "#sign-out").await;
    until(
        &client,
        "the signed-out page",
        "return !document.getElementById('signin').hidden",
        Duration::from_secs(10),
    )
    .await;
    let answer = svc
        .client()
        .get(format!("{}/v1/session", svc.url))
        .header("cookie", format!("__Host-sparkle_session={session}"))
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 401, "the session ended on the server");
    client.refresh().await.expect("reload");
    until(
        &client,
        "still signed out after a reload",
        "return !document.getElementById('signin').hidden",
        Duration::from_secs(10),
    )
    .await;
    screenshot(&client, &shots, "5-signed-out").await;
    client.close().await.expect("close the browser");
    eprintln!("browser screenshots: {}", shots.display());
}
