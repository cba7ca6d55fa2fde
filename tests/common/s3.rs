//! The real S3 stores the tests run against, started by `.ci/s3_up.sh`
//! and named by `LAYBAK_TEST_S3` (colon-separated env files). Under CI a
//! missing store fails the test; elsewhere the test says loudly that it
//! was skipped.

use laybak::backend::s3::{S3Backend, S3Config};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One store: its name (`garage`, `garage-faults`, `ceph`), the variables
/// a laybak process needs to reach it, and (Garage) its nodes.
#[derive(Clone, Debug)]
pub struct Store {
    pub name: String,
    pub vars: Vec<(String, String)>,
    pub bucket: String,
    pub nodes: Vec<PathBuf>,
}

fn parse(path: &str) -> Store {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut vars = Vec::new();
    let (mut name, mut bucket, mut nodes, mut create) =
        (String::new(), String::new(), vec![], false);
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "LAYBAK_TEST_STORE" => name = v.to_string(),
            "LAYBAK_TEST_BUCKET" => bucket = v.to_string(),
            "LAYBAK_TEST_NODES" => nodes = v.split(':').map(PathBuf::from).collect(),
            "LAYBAK_TEST_CREATE_BUCKET" => create = v == "1",
            _ => vars.push((k.to_string(), v.to_string())),
        }
    }
    let s = Store {
        name,
        vars,
        bucket,
        nodes,
    };
    if create {
        s.create_bucket();
    }
    s
}

/// Every configured store; an empty list (after a loud message) when none
/// is configured outside CI.
pub fn stores() -> Vec<Store> {
    match std::env::var("LAYBAK_TEST_S3") {
        Ok(v) if !v.is_empty() => v.split(':').map(parse).collect(),
        _ if std::env::var_os("CI").is_some() => {
            panic!("LAYBAK_TEST_S3 is not set: CI must start the S3 stores (.ci/s3_up.sh)")
        }
        _ => {
            eprintln!(
                "\n*** SKIPPED: no S3 store; start them with `.ci/s3_up.sh DIR` and set LAYBAK_TEST_S3 to what it prints ***\n"
            );
            Vec::new()
        }
    }
}

/// The store of that name, if configured (CI configures all).
pub fn store(name: &str) -> Option<Store> {
    let s = stores().into_iter().find(|s| s.name == name);
    if s.is_none() && std::env::var_os("LAYBAK_TEST_S3").is_some() {
        if std::env::var_os("CI").is_some() {
            panic!("store {name} is not in LAYBAK_TEST_S3");
        }
        eprintln!("\n*** SKIPPED: store {name} is not in LAYBAK_TEST_S3 ***\n");
    }
    s
}

/// A fresh prefix no other test uses.
pub fn unique(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{n:x}", std::process::id())
}

impl Store {
    pub fn var(&self, k: &str) -> &str {
        self.vars
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }

    pub fn location(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    pub fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: self.var("AWS_ENDPOINT_URL").parse().unwrap(),
            path_style: true,
            bucket: self.bucket.clone(),
            prefix: prefix.to_string(),
            region: self.var("AWS_REGION").to_string(),
            key: self.var("AWS_ACCESS_KEY_ID").to_string(),
            secret: self.var("AWS_SECRET_ACCESS_KEY").to_string(),
            token: None,
        }
    }

    pub fn backend(&self, prefix: &str) -> S3Backend {
        S3Backend::new(&self.config(prefix)).unwrap()
    }

    fn create_bucket(&self) {
        use rusty_s3::S3Action;
        let cfg = self.config("");
        let bucket = rusty_s3::Bucket::new(
            cfg.endpoint.clone(),
            rusty_s3::UrlStyle::Path,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .unwrap();
        let creds = rusty_s3::Credentials::new(&cfg.key, &cfg.secret);
        let url = bucket.create_bucket(&creds).sign(Duration::from_secs(600));
        // Ceph answers 409 when it exists (an earlier test made it).
        let start = Instant::now();
        loop {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            match agent.put(url.as_str()).send_empty() {
                Ok(r) if r.status().as_u16() < 300 || r.status().as_u16() == 409 => return,
                r if start.elapsed() > Duration::from_secs(60) => {
                    panic!("cannot create bucket on {}: {r:?}", self.name)
                }
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Stop node `i` (0-based) at once, as a crash would.
    pub fn stop_node(&self, i: usize) {
        let pid = std::fs::read_to_string(self.nodes[i].join("pid")).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Start node `i` again.
    pub fn start_node(&self, i: usize) {
        let st = std::process::Command::new(self.nodes[i].join("start.sh"))
            .status()
            .unwrap();
        assert!(st.success());
    }
}
