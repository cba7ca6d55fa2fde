//! Command-line interface: argument types and thin command handlers that
//! call into the library and render human or `--json` output.

use crate::error::{Error as Failure, Kind, need_root};
use crate::format::SnapshotId;
use crate::layer::{self, View};
use crate::materialize::{self, Item, Target};
use crate::repo::{Repo, Snapshot};
use crate::volume::{self, AttachOpts, Volume};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// laybak: layered backups on OverlayFS.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Repository directory.
    #[arg(long, global = true, env = "LAYBAK_REPO")]
    pub repo: Option<PathBuf>,
    /// Where volume state lives.
    #[arg(
        long,
        global = true,
        env = "LAYBAK_STATE_DIR",
        default_value = "/var/lib/laybak"
    )]
    pub state_dir: PathBuf,
    /// File holding the password of an encrypted repository (one trailing
    /// newline is dropped). Else `--password-command`, `LAYBAK_PASSWORD`,
    /// or a prompt on the terminal.
    #[arg(long, global = true, env = "LAYBAK_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Shell command that prints the password of an encrypted repository.
    #[arg(
        long,
        global = true,
        env = "LAYBAK_PASSWORD_COMMAND",
        value_name = "CMD"
    )]
    pub password_command: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a new repository (encrypted unless `--no-encryption`).
    Init(InitArgs),
    /// Turn a directory into a volume; its contents become the first snapshot.
    Attach(AttachArgs),
    /// Seal the volume's changes as a new snapshot.
    Snapshot(SnapshotArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// List volumes attached on this host.
    Volumes(VolumesArgs),
    /// What changed in a volume since its last snapshot.
    Status(StatusArgs),
    /// Paths added, deleted or modified between two snapshots.
    Diff(DiffArgs),
    /// Restore a snapshot into an empty directory, from the repository alone.
    Restore(RestoreArgs),
    /// Mount a snapshot read-only.
    Mount(MountArgs),
    /// Unmount a snapshot mounted with `laybak mount`.
    Umount(UmountArgs),
    /// Unmount a volume cleanly (e.g. before shutdown).
    Down(DownArgs),
    /// Mount volumes again (e.g. after a reboot).
    Up(UpArgs),
    /// Stop managing a volume: leave a plain directory with its contents.
    Detach(DetachArgs),
    /// Forget snapshots by a retention policy; their layers are squashed
    /// into the next kept snapshot's.
    Forget(ForgetArgs),
    /// Fold every snapshot of a volume before SNAP into SNAP's base layer.
    Squash(SquashArgs),
    /// Delete data no snapshot references.
    Prune(PruneArgs),
    /// Show or set a volume's retention policy (used by `snapshot --forget`).
    Policy(PolicyArgs),
    /// Repair the repository: `index` rebuilds the index from the packs.
    Repair(RepairArgs),
    /// Verify the repository.
    Check(CheckArgs),
    /// Manage the passwords of an encrypted repository.
    Key(KeyArgs),
}

/// Arguments of `laybak init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Store everything in plaintext: whoever can read the repository
    /// (a stolen disk, the storage provider) can read every file in it.
    #[arg(long)]
    pub no_encryption: bool,
}

/// Arguments of `laybak key`.
#[derive(Args, Debug)]
pub struct KeyArgs {
    /// What to do.
    #[command(subcommand)]
    pub what: KeyCmd,
}

/// `laybak key` commands. Each key wraps the same master key under its
/// own password; any one of them opens the repository.
#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// List the keys (`*` marks the one the password opened).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Add a key with a new password.
    Add(NewPasswordArgs),
    /// Remove a key (not the last one, not the one in use).
    Remove {
        /// Key id or unique prefix, from `laybak key list`.
        id: String,
    },
    /// Change the password: add a key with the new one, remove the one
    /// the current password opened.
    Passwd(NewPasswordArgs),
}

/// Where a new password comes from.
#[derive(Args, Debug)]
pub struct NewPasswordArgs {
    /// File holding the new password. Else `LAYBAK_NEW_PASSWORD`, or it is
    /// asked twice on the terminal.
    #[arg(long, env = "LAYBAK_NEW_PASSWORD_FILE", value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,
}

/// Arguments of `laybak attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The directory.
    pub path: PathBuf,
    /// Volume name (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Merge local layers beyond this many (keeps the live chain short:
    /// every layer that holds a directory slows lookups of new names in it).
    #[arg(long, default_value_t = volume::DEFAULT_MAX_LAYERS)]
    pub max_layers: usize,
    /// Tag for the first snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Print the first snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The volume directory.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub path: Option<PathBuf>,
    /// Snapshot every volume in the state directory.
    #[arg(long)]
    pub all: bool,
    /// Tag for the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Seconds to wait for open files to close before failing.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
    /// Seconds to wait while the repository is being pruned.
    #[arg(long, default_value_t = 60)]
    pub lock_wait: u64,
    /// Apply the volume's stored retention policy afterwards.
    #[arg(long)]
    pub forget: bool,
    /// Prune after forgetting.
    #[arg(long, requires = "forget")]
    pub prune: bool,
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak snapshots`.
#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only this volume.
    #[arg(long)]
    pub volume: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak volumes`.
#[derive(Args, Debug)]
pub struct VolumesArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The volume directory.
    pub path: PathBuf,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak diff`.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// Older snapshot.
    pub a: String,
    /// Newer snapshot.
    pub b: String,
    /// Volume for `latest`.
    #[arg(long)]
    pub volume: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// Target directory (new or empty).
    pub target: PathBuf,
    /// Restore only these paths (repeatable).
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Volume for `latest`.
    #[arg(long)]
    pub volume: Option<String>,
    /// Do not recreate device nodes (always so when the target belongs
    /// to a user other than root).
    #[arg(long)]
    pub no_devices: bool,
    /// Clear setuid/setgid bits and drop file capabilities (always so
    /// when the target belongs to a user other than root).
    #[arg(long)]
    pub no_setuid: bool,
}

/// Arguments of `laybak mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// Mount point (an empty directory; created if missing).
    pub target: PathBuf,
    /// Volume for `latest`.
    #[arg(long)]
    pub volume: Option<String>,
    /// Bound on the local layer cache (`STATE/cache`, layers of
    /// snapshots mounted from the repository): least recently used
    /// layers no mount uses are removed beyond it. Suffixes K, M, G, T.
    #[arg(long, env = "LAYBAK_CACHE_MAX", default_value = "10G", value_parser = parse_size)]
    pub cache_max: u64,
}

/// Arguments of `laybak umount`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// The mount point.
    pub target: PathBuf,
}

/// Arguments of `laybak down`.
#[derive(Args, Debug)]
pub struct DownArgs {
    /// The volume directory.
    pub path: PathBuf,
    /// Seconds to wait for open files to close.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
}

/// Arguments of `laybak up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// The volume directory.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub path: Option<PathBuf>,
    /// Every volume in the state directory.
    #[arg(long)]
    pub all: bool,
}

/// Arguments of `laybak detach`.
#[derive(Args, Debug)]
pub struct DetachArgs {
    /// The volume directory.
    pub path: PathBuf,
    /// Seconds to wait for open files to close.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
}

/// Arguments of `laybak forget`.
#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Only this volume's snapshots.
    #[arg(long)]
    pub volume: Option<String>,
    /// Only snapshots taken on this host (each host's volume is its
    /// own history either way).
    #[arg(long)]
    pub host: Option<String>,
    /// The rules.
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Print what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune afterwards.
    #[arg(long)]
    pub prune: bool,
    /// Repack packs whose unused share is above this (with --prune).
    #[arg(long, default_value = "5%", value_parser = parse_fraction)]
    pub max_unused: f64,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak squash`.
#[derive(Args, Debug)]
pub struct SquashArgs {
    /// The volume.
    #[arg(long)]
    pub volume: String,
    /// The oldest snapshot to keep.
    #[arg(long)]
    pub until: String,
    /// Print what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Print what would be removed and the bytes freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Repack packs whose unused share is above this.
    #[arg(long, default_value = "5%", value_parser = parse_fraction)]
    pub max_unused: f64,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `laybak policy`.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// The volume directory.
    pub path: PathBuf,
    /// The rules to store.
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Remove the stored policy.
    #[arg(long)]
    pub clear: bool,
    /// How snapshots rotate the volume: `swap` (default: no gap, readers
    /// and working directories keep a frozen view) or `strict` (0.1's
    /// unmount and remount: any use of the volume blocks a snapshot).
    #[arg(long, value_enum)]
    pub rotation: Option<Rotation>,
    /// Quiesce hook run (`sh -c`) before the volume is sealed, e.g.
    /// `systemctl stop app` or `sqlite3 db .backup` ("" removes it).
    #[arg(long, value_name = "COMMAND")]
    pub before: Option<String>,
    /// Hook run after sealing, always once `before` ran (even when it or
    /// the sealing failed), e.g. `systemctl start app` ("" removes it).
    #[arg(long, value_name = "COMMAND")]
    pub after: Option<String>,
    /// Seconds a hook may run before it is killed.
    #[arg(long, value_name = "SECS")]
    pub hook_timeout: Option<u64>,
    /// Bound on the live chain (as `attach --max-layers`); applies from
    /// the next snapshot.
    #[arg(long, value_name = "N")]
    pub max_layers: Option<usize>,
}

/// Arguments of `laybak repair`.
#[derive(Args, Debug)]
pub struct RepairArgs {
    /// What to repair.
    #[arg(value_enum)]
    pub what: RepairWhat,
}

/// Arguments of `laybak check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Read every pack and verify every blob's blake3.
    #[arg(long)]
    pub read_data: bool,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Retention rules (a snapshot is kept when any rule keeps it; the newest of
/// each volume is always kept).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeepArgs {
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours.
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: usize,
    /// ... of each of the last N days.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: usize,
    /// ... of each of the last N weeks.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: usize,
    /// ... of each of the last N months.
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: usize,
    /// ... of each of the last N years.
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: usize,
    /// Keep everything within this duration of the newest (e.g. 2d, 12h).
    #[arg(long, value_parser = parse_duration)]
    pub keep_within: Option<Duration>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long = "keep-tag")]
    pub keep_tags: Vec<String>,
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 2d, 12h, 1w)"))
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size (a number of bytes, or with K, M, G or T)"))
}

fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a percentage (example: 5%)"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s:?} must be between 0% and 100%"));
    }
    Ok(v)
}

impl KeepArgs {
    fn policy(&self) -> crate::reclaim::Policy {
        crate::reclaim::Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within_secs: self.keep_within.map(|d| d.as_secs()),
            tags: self.keep_tags.clone(),
        }
    }
}

/// How a volume rotates at a snapshot.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Rotation {
    /// Swap generations with no gap (kernel 6.5+).
    Swap,
    /// Unmount and remount; every use of the volume blocks it.
    Strict,
}

/// What `repair` can rebuild.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RepairWhat {
    /// Rebuild the index from the packs (after a lost or damaged index).
    Index,
}

fn repo_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(r) = &cli.repo {
        return Ok(r.clone());
    }
    let vols = volume::all(&cli.state_dir).unwrap_or_default();
    let mut repos: Vec<&PathBuf> = vols.iter().map(|v| &v.st.repo).collect();
    repos.sort();
    repos.dedup();
    match repos.as_slice() {
        [one] => Ok((*one).clone()),
        _ => Err(Failure::new(
            Kind::Usage,
            "no repository given: pass --repo PATH or set LAYBAK_REPO",
        )
        .into()),
    }
}

fn open_repo(cli: &Cli) -> Result<Repo> {
    Repo::open(&repo_path(cli)?, &cli.passwords())
}

impl Cli {
    /// Where the repository password comes from.
    pub fn passwords(&self) -> crate::password::Source {
        crate::password::Source {
            file: self.password_file.clone(),
            command: self.password_command.clone(),
        }
    }
}

fn tty() -> bool {
    std::io::stderr().is_terminal()
}

/// JSON form of a snapshot.
pub fn snap_json(id: &SnapshotId, s: &Snapshot) -> serde_json::Value {
    json!({
        "id": id.hex(),
        "short_id": id.short(),
        "time": s.time.rfc3339(),
        "volume": s.volume,
        "hostname": s.hostname,
        "tags": s.tags,
        "parent": s.parent.map(|p| p.hex()),
        "layers": s.layers.iter().map(|l| l.hex()).collect::<Vec<_>>(),
        "summary": s.summary,
    })
}

fn validate_tags(tags: &[String]) -> Result<()> {
    for t in tags {
        if t.is_empty() || t.contains(',') || t.chars().any(char::is_control) {
            bail!(
                "tag {t:?} is not usable: tags are non-empty and have no commas or control characters"
            );
        }
    }
    Ok(())
}

/// Run a parsed command line.
///
/// # Errors
/// Whatever the command reports; the caller prints it as one line.
pub fn run(cli: Cli) -> Result<()> {
    volume::secure_state(&cli.state_dir)?;
    match &cli.cmd {
        Cmd::Init(a) => cmd_init(&cli, a),
        Cmd::Attach(a) => cmd_attach(&cli, a),
        Cmd::Snapshot(a) => cmd_snapshot(&cli, a),
        Cmd::Snapshots(a) => cmd_snapshots(&cli, a),
        Cmd::Volumes(a) => cmd_volumes(&cli, a),
        Cmd::Status(a) => cmd_status(&cli, a),
        Cmd::Diff(a) => cmd_diff(&cli, a),
        Cmd::Restore(a) => cmd_restore(&cli, a),
        Cmd::Mount(a) => cmd_mount(&cli, a),
        Cmd::Umount(a) => cmd_umount(&cli, a),
        Cmd::Down(a) => cmd_down(&cli, a),
        Cmd::Up(a) => cmd_up(&cli, a),
        Cmd::Detach(a) => cmd_detach(&cli, a),
        Cmd::Forget(a) => cmd_forget(&cli, a),
        Cmd::Squash(a) => cmd_squash(&cli, a),
        Cmd::Prune(a) => cmd_prune(&cli, a),
        Cmd::Policy(a) => cmd_policy(&cli, a),
        Cmd::Repair(a) => cmd_repair(&cli, a),
        Cmd::Check(a) => cmd_check(&cli, a),
        Cmd::Key(a) => cmd_key(&cli, a),
    }
}

fn cmd_init(cli: &Cli, a: &InitArgs) -> Result<()> {
    let p = cli
        .repo
        .clone()
        .ok_or_else(|| Failure::new(Kind::Usage, "init needs --repo PATH (or LAYBAK_REPO)"))?;
    if a.no_encryption {
        let r = Repo::init(&p, &crate::repo::Protection::Plaintext)?;
        eprintln!(
            "created plaintext repository {} at {}: whoever can read it can read every file backed up into it",
            r.config.id.short(),
            p.display()
        );
        return Ok(());
    }
    let password = cli.passwords().new_password(&p.display().to_string())?;
    let kdf = new_kdf()?;
    let r = Repo::init(&p, &crate::repo::Protection::Encrypted { password, kdf })?;
    warn_weak_kdf(&kdf);
    eprintln!(
        "created encrypted repository {} at {} (key {}). Keep the password safe: without it, or the password of another key, nobody can read the data, laybak included",
        r.config.id.short(),
        p.display(),
        r.key.map(|k| k.short()).unwrap_or_default()
    );
    Ok(())
}

fn cmd_key(cli: &Cli, a: &KeyArgs) -> Result<()> {
    let repo = open_repo(cli)?;
    if !repo.is_encrypted() {
        bail!(
            "{} is a plaintext repository: it has no keys (make an encrypted one with `laybak init`)",
            repo.location.display()
        );
    }
    match &a.what {
        KeyCmd::List { json } => {
            let keys = repo.key_files()?;
            if *json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|(id, k, m)| {
                        json!({"id": id.hex(), "current": repo.key == Some(*id),
                               "created": m.created.rfc3339(), "host": m.host,
                               "kdf": {"algorithm": "argon2id", "memory_kib": k.kdf.memory_kib,
                                       "iterations": k.kdf.iterations, "lanes": k.kdf.lanes}})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (id, k, m) in &keys {
                    println!(
                        "{} {}  {}  {}  argon2id {} MiB x{}",
                        if repo.key == Some(*id) { "*" } else { " " },
                        id.short(),
                        m.created.rfc3339(),
                        m.host,
                        k.kdf.memory_kib / 1024,
                        k.kdf.iterations
                    );
                }
            }
            Ok(())
        }
        KeyCmd::Add(n) => {
            let pw = crate::password::new_key_password(n.new_password_file.as_deref())?;
            let _l = crate::lock::exclusive(&repo, "key add")?;
            let kdf = new_kdf()?;
            let id = repo.add_key(pw.as_bytes(), kdf)?;
            warn_weak_kdf(&kdf);
            eprintln!("added key {}", id.short());
            Ok(())
        }
        KeyCmd::Remove { id } => {
            let _l = crate::lock::exclusive(&repo, "key remove")?;
            let id = resolve_key(&repo, id)?;
            repo.remove_key(&id)?;
            eprintln!("removed key {}", id.short());
            Ok(())
        }
        KeyCmd::Passwd(n) => {
            let pw = crate::password::new_key_password(n.new_password_file.as_deref())?;
            let _l = crate::lock::exclusive(&repo, "key passwd")?;
            let old = repo
                .key
                .ok_or_else(|| anyhow!("internal error: no key in use"))?;
            let kdf = new_kdf()?;
            let new = repo.add_key(pw.as_bytes(), kdf)?;
            warn_weak_kdf(&kdf);
            // The new key is durable before the old one goes.
            repo.delete_file(&old).with_context(|| {
                format!(
                    "added key {} but could not remove the old key {}",
                    new.short(),
                    old.short()
                )
            })?;
            eprintln!(
                "password changed: key {} replaces {}",
                new.short(),
                old.short()
            );
            Ok(())
        }
    }
}

/// Argon2id parameters for a new key.
fn new_kdf() -> Result<crate::crypt::Kdf> {
    crate::crypt::Kdf::for_new_key()
}

/// Say so when `LAYBAK_KDF` made a new key weaker (after it was made).
fn warn_weak_kdf(kdf: &crate::crypt::Kdf) {
    if std::env::var_os("LAYBAK_KDF").is_some() {
        eprintln!(
            "laybak: warning: LAYBAK_KDF is set ({} KiB, {} passes): this key is no harder to guess than its password",
            kdf.memory_kib, kdf.iterations
        );
    }
}

fn resolve_key(repo: &Repo, spec: &str) -> Result<crate::format::KeyId> {
    let spec_l = spec.to_ascii_lowercase();
    if spec_l.is_empty() || !spec_l.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{spec:?} is not a key id: give an id or prefix from `laybak key list`");
    }
    let m: Vec<_> = repo
        .ids::<crate::format::KeyId>()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.hex().starts_with(&spec_l))
        .collect();
    match m.as_slice() {
        [] => bail!("no key matches {spec:?}: list them with `laybak key list`"),
        [one] => Ok(*one),
        _ => bail!(
            "key id {spec:?} is ambiguous ({} matches): give more characters",
            m.len()
        ),
    }
}

fn cmd_attach(cli: &Cli, a: &AttachArgs) -> Result<()> {
    let AttachArgs {
        path,
        name,
        max_layers,
        tags,
        json,
    } = a;
    validate_tags(tags)?;
    need_root("attach")?;
    let repo = open_repo(cli)?;
    let mut vol = volume::attach(
        &cli.state_dir,
        &repo,
        path,
        AttachOpts {
            name: name.clone(),
            max_layers: *max_layers,
            tags: tags.clone(),
        },
    )?;
    let done = volume::archive_pending(&mut vol, &repo, tty(), LOCK_WAIT).with_context(|| {
        format!(
            "{} is attached and mounted, but its contents could not be archived yet (they are safe in the local layer store; the next `laybak snapshot` archives them)",
            vol.st.path.display()
        )
    })?;
    // Build the local blob cache now, while the import is costing
    // memory per file anyway, not in the first hourly snapshot.
    let _ = crate::blobcache::BlobCache::open(&cli.state_dir, &repo);
    print_snaps(&done, *json, false)
}

fn cmd_snapshot(cli: &Cli, a: &SnapshotArgs) -> Result<()> {
    let SnapshotArgs {
        path,
        all,
        tags,
        wait,
        lock_wait,
        forget,
        prune,
        json,
    } = a;
    validate_tags(tags)?;
    need_root("snapshot")?;
    let vols = if *all {
        volume::all(&cli.state_dir)?
    } else {
        vec![volume::find(
            &cli.state_dir,
            path.as_deref().unwrap_or(Path::new(".")),
        )?]
    };
    if vols.is_empty() {
        bail!(
            "no volumes in {}: attach one first",
            cli.state_dir.display()
        );
    }
    let mut results = Vec::new();
    let mut failures = Vec::new();
    // One key derivation per repository, not per volume; but a fresh
    // handle for each volume (and for its forget), so nothing of an index
    // read before another host's prune is trusted.
    let mut repos = Opener {
        source: cli.passwords(),
        known: Default::default(),
        opened: Default::default(),
    };
    for mut v in vols {
        // The password is got before the volume is locked: a prompt or a
        // slow password command must not keep other runs off the volume.
        if let Err(e) = repos.password_for(&v) {
            if *all {
                failures.push((v.st.name.clone(), e));
                continue;
            }
            return Err(e);
        }
        let mut open = |p: &Path| repos.open(p);
        match snapshot_one(
            &mut v,
            &mut open,
            tags,
            Duration::from_secs(*wait),
            Duration::from_secs(*lock_wait),
        )
        .and_then(|a| {
            if *forget {
                apply_policy(&v, &open(&v.st.repo)?, *prune)?;
            }
            Ok(a)
        }) {
            Ok(a) => results.push(a),
            Err(e) if *all => failures.push((v.st.name.clone(), e)),
            Err(e) => return Err(e),
        }
        // Told to stop while a volume's hooks ran: no further volume.
        if crate::hooks::stop_requested() {
            break;
        }
    }
    print_snaps(&results, *json, *all)?;
    if let Some((name, e)) = failures.into_iter().next() {
        return Err(e.context(format!("volume {name}")));
    }
    Ok(())
}

/// Opens the repositories of `snapshot`: each password is got once, each
/// key derived once, and every volume gets a fresh handle.
struct Opener {
    source: crate::password::Source,
    known: std::collections::HashMap<PathBuf, crate::password::Password>,
    opened: std::collections::HashMap<PathBuf, Repo>,
}

impl Opener {
    /// Get the password of `v`'s repository now, if it is encrypted and not
    /// open yet.
    fn password_for(&mut self, v: &Volume) -> Result<()> {
        let path = &v.st.repo;
        if v.st.repo_encrypted && !self.opened.contains_key(path) && !self.known.contains_key(path)
        {
            use crate::password::Passwords;
            let p = self.source.current(&path.display().to_string())?;
            self.known.insert(path.clone(), p);
        }
        Ok(())
    }

    fn open(&mut self, path: &Path) -> Result<Repo> {
        if let Some(r) = self.opened.get(path) {
            return r.reopen();
        }
        let r = match self.known.remove(path) {
            Some(p) => Repo::open(path, &crate::password::Given(p))?,
            None => Repo::open(path, &self.source)?,
        };
        let fresh = r.reopen();
        self.opened.insert(path.to_path_buf(), r);
        fresh
    }
}

fn cmd_snapshots(cli: &Cli, a: &SnapshotsArgs) -> Result<()> {
    let SnapshotsArgs { volume, json } = a;
    let repo = open_repo(cli)?;
    let (all, bad) = repo.snapshots_tolerant()?;
    for (id, e) in &bad {
        eprintln!(
            "laybak: warning: snapshot {} is unreadable ({e:#}); run `laybak check`",
            id.short()
        );
    }
    let snaps: Vec<_> = all
        .into_iter()
        .filter(|(_, s)| volume.as_ref().is_none_or(|v| &s.volume == v))
        .collect();
    if *json {
        let v: Vec<_> = snaps.iter().map(|(i, s)| snap_json(i, s)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<10} {:<31} {:<12} {:>7} {:>12}  tags",
            "id", "time", "volume", "layers", "added"
        );
        for (id, s) in &snaps {
            println!(
                "{:<10} {:<31} {:<12} {:>7} {:>12}  {}",
                id.short(),
                s.time.rfc3339(),
                s.volume,
                s.layers.len(),
                s.summary.new_bytes,
                s.tags.join(",")
            );
        }
    }
    Ok(())
}

fn cmd_volumes(cli: &Cli, a: &VolumesArgs) -> Result<()> {
    let VolumesArgs { json } = a;
    let vols = volume::all(&cli.state_dir)?;
    if *json {
        let v: Vec<_> = vols
            .iter()
            .map(|v| {
                json!({"name": v.st.name, "path": v.st.path, "repo": v.st.repo,
                "layers": v.st.layers.len(),
                "pending": v.st.layers.iter().filter(|l| l.archived.is_empty()).count(),
                "mounted": v.is_mounted().unwrap_or(false)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for v in vols {
            println!(
                "{}\t{}\t{} layers\t{}",
                v.st.name,
                v.st.path.display(),
                v.st.layers.len(),
                if v.is_mounted().unwrap_or(false) {
                    "up"
                } else {
                    "down"
                }
            );
        }
    }
    Ok(())
}

fn cmd_status(cli: &Cli, a: &StatusArgs) -> Result<()> {
    let StatusArgs { path, json } = a;
    let vol = volume::find(&cli.state_dir, path)?;
    let changes = volume::status(&vol)?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&changes)?);
    } else {
        for c in changes {
            let l = match c.change {
                "added" => '+',
                "deleted" => '-',
                "replaced" => 'R',
                "renamed" => '>',
                _ => 'M',
            };
            match &c.from {
                Some(from) => println!(
                    "{l} {} (from {})",
                    layer::escape(&c.path),
                    layer::escape(from)
                ),
                None => println!("{l} {}", layer::escape(&c.path)),
            }
        }
    }
    Ok(())
}

fn cmd_diff(cli: &Cli, a: &DiffArgs) -> Result<()> {
    let DiffArgs { a, b, volume, json } = a;
    let repo = open_repo(cli)?;
    let _l = crate::lock::for_reading(&repo, "diff", LOCK_WAIT)?;
    let (_, sa) = repo.resolve(a, volume.as_deref())?;
    let (_, sb) = repo.resolve(b, volume.as_deref())?;
    let la = repo.layers_of(&sa)?;
    let lb = repo.layers_of(&sb)?;
    let d = diff_views(&layer::restack(&la), &layer::restack(&lb));
    if *json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"added": d.0, "deleted": d.1, "modified": d.2}))?
        );
    } else {
        for p in &d.0 {
            println!("+ {}", layer::escape(p));
        }
        for p in &d.1 {
            println!("- {}", layer::escape(p));
        }
        for p in &d.2 {
            println!("M {}", layer::escape(p));
        }
    }
    Ok(())
}

fn cmd_restore(cli: &Cli, a: &RestoreArgs) -> Result<()> {
    let RestoreArgs {
        snapshot,
        target,
        paths,
        volume,
        no_devices,
        no_setuid,
    } = a;
    let repo = open_repo(cli)?;
    let _l = crate::lock::for_reading(&repo, "restore", LOCK_WAIT)?;
    let (_, snap) = repo.resolve(snapshot, volume.as_deref())?;
    let layers = repo.layers_of(&snap)?;
    let view = layer::restack(&layers);
    let items = select(&view, paths)?;
    let dest = materialize::prepare_target(target)?;
    // A target a user owns is one that user can reach: no devices,
    // no setuid files, no capabilities from the repository there.
    let safety = materialize::Safety {
        no_devices: *no_devices || dest.foreign,
        no_setuid: *no_setuid || dest.foreign,
    };
    let bar = tty().then(|| crate::progress::bytes_bar("restoring"));
    let res = materialize::write_tree(&repo, &dest, &items, Target::Plain, safety, bar.as_ref());
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let stats = res.inspect_err(|_| dest.give_back())?;
    if dest.foreign {
        eprintln!(
            "laybak: note: {} belonged to another user, so device nodes, setuid/setgid bits and file capabilities were not restored{}",
            target.display(),
            if stats.skipped_devices > 0 {
                format!(" ({} device nodes left out)", stats.skipped_devices)
            } else {
                String::new()
            }
        );
    } else if stats.skipped_devices > 0 {
        eprintln!(
            "laybak: note: {} device nodes left out (--no-devices)",
            stats.skipped_devices
        );
    }
    Ok(())
}

fn cmd_mount(cli: &Cli, a: &MountArgs) -> Result<()> {
    let MountArgs {
        snapshot,
        target,
        volume,
        cache_max,
    } = a;
    need_root("mount")?;
    let repo = open_repo(cli)?;
    let _l = crate::lock::for_reading(&repo, "mount", LOCK_WAIT)?;
    let (id, snap) = repo.resolve(snapshot, volume.as_deref())?;
    crate::mounts::mount_snapshot(&cli.state_dir, &repo, &id, &snap, target)?;
    crate::mounts::evict_to_size(&cli.state_dir, *cache_max)
}

fn cmd_umount(cli: &Cli, a: &UmountArgs) -> Result<()> {
    let UmountArgs { target } = a;
    need_root("umount")?;
    crate::mounts::umount(&cli.state_dir, target)
}

fn cmd_down(cli: &Cli, a: &DownArgs) -> Result<()> {
    let DownArgs { path, wait } = a;
    need_root("down")?;
    let mut vol = volume::find(&cli.state_dir, path)?;
    volume::down(&mut vol, Duration::from_secs(*wait))
}

fn cmd_up(cli: &Cli, a: &UpArgs) -> Result<()> {
    let UpArgs { path, all } = a;
    need_root("up")?;
    let vols = if *all {
        volume::all(&cli.state_dir)?
    } else {
        vec![volume::find(
            &cli.state_dir,
            path.as_deref().unwrap_or(Path::new(".")),
        )?]
    };
    let mut first_err = None;
    for mut v in vols {
        if let Err(e) = volume::up(&mut v) {
            eprintln!("laybak: volume {}: {e:#}", v.st.name);
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn cmd_detach(cli: &Cli, a: &DetachArgs) -> Result<()> {
    let DetachArgs { path, wait } = a;
    need_root("detach")?;
    let mut vol = volume::find(&cli.state_dir, path)?;
    let pending = volume::detach(&mut vol, Duration::from_secs(*wait))?;
    if pending > 0 {
        eprintln!(
            "laybak: note: {pending} layer(s) of {} were never archived; their changes are in the directory but in no snapshot",
            vol.st.name
        );
    }
    Ok(())
}

fn cmd_forget(cli: &Cli, a: &ForgetArgs) -> Result<()> {
    let ForgetArgs {
        volume,
        host,
        keep,
        dry_run,
        prune,
        max_unused,
        json,
    } = a;
    let policy = keep.policy();
    if policy.is_empty() {
        return Err(Failure::new(Kind::Usage,
            "no retention rule given: pass at least one --keep-* option (the newest snapshot of each volume is always kept)",
        )
        .into());
    }
    let repo = open_repo(cli)?;
    let keep_fn = crate::reclaim::keep_by(policy);
    let scope = crate::reclaim::Scope {
        volume: volume.as_deref(),
        host: host.as_deref(),
    };
    run_forget(
        &cli.state_dir,
        &repo,
        &keep_fn,
        scope,
        *dry_run,
        prune.then_some(*max_unused),
        *json,
    )
}

fn cmd_squash(cli: &Cli, a: &SquashArgs) -> Result<()> {
    let SquashArgs {
        volume,
        until,
        dry_run,
        json,
    } = a;
    let repo = open_repo(cli)?;
    let (id, snap) = repo.resolve(until, Some(volume))?;
    if &snap.volume != volume {
        bail!(
            "snapshot {} belongs to volume {}, not {volume}",
            id.short(),
            snap.volume
        );
    }
    let keep_fn = crate::reclaim::keep_from(id);
    let scope = crate::reclaim::Scope {
        volume: Some(volume),
        host: Some(&snap.hostname),
    };
    run_forget(
        &cli.state_dir,
        &repo,
        &keep_fn,
        scope,
        *dry_run,
        None,
        *json,
    )
}

fn cmd_prune(cli: &Cli, a: &PruneArgs) -> Result<()> {
    let PruneArgs {
        dry_run,
        max_unused,
        json,
    } = a;
    let repo = open_repo(cli)?;
    let r = crate::reclaim::prune(&repo, *max_unused, *dry_run, None)?;
    print_prune(&r, *dry_run, *json)
}

fn cmd_policy(cli: &Cli, a: &PolicyArgs) -> Result<()> {
    let PolicyArgs {
        path,
        keep,
        clear,
        rotation,
        before,
        after,
        hook_timeout,
        max_layers,
    } = a;
    let mut vol = volume::find(&cli.state_dir, path)?;
    let _lock = vol.lock()?;
    if let Some(m) = max_layers {
        vol.st.max_layers = (*m).clamp(2, 400);
        vol.save()?;
    }
    if let Some(r) = rotation {
        vol.st.strict_rotation = matches!(r, Rotation::Strict);
        vol.save()?;
    }
    if before.is_some() || after.is_some() || hook_timeout.is_some() {
        let mut h = vol.st.hooks.clone().unwrap_or(crate::hooks::Hooks {
            timeout_secs: crate::hooks::DEFAULT_TIMEOUT_SECS,
            ..Default::default()
        });
        let set = |v: &Option<String>, old: Option<String>| match v {
            Some(c) if c.is_empty() => None,
            Some(c) => Some(c.clone()),
            None => old,
        };
        h.before = set(before, h.before.take());
        h.after = set(after, h.after.take());
        if let Some(t) = hook_timeout {
            h.timeout_secs = *t;
        }
        vol.st.hooks = (h.before.is_some() || h.after.is_some()).then_some(h);
        vol.save()?;
    }
    let p = keep.policy();
    if *clear {
        vol.st.policy = None;
        vol.save()?;
    } else if !p.is_empty() {
        vol.st.policy = Some(p);
        vol.save()?;
    }
    println!("{}", serde_json::to_string_pretty(&vol.st.policy)?);
    Ok(())
}

fn cmd_repair(cli: &Cli, a: &RepairArgs) -> Result<()> {
    let RepairArgs {
        what: RepairWhat::Index,
    } = a;
    let repo = open_repo(cli)?;
    let r = crate::reclaim::repair_index(&repo)?;
    for p in &r.unreadable_packs {
        eprintln!("laybak: unreadable pack {p}");
    }
    println!(
        "indexed {} blobs from {} packs; {} damaged blobs and {} unreadable packs left out",
        r.blobs,
        r.packs,
        r.bad_blobs,
        r.unreadable_packs.len()
    );
    Ok(())
}

fn cmd_check(cli: &Cli, a: &CheckArgs) -> Result<()> {
    let CheckArgs { read_data, json } = a;
    let repo = open_repo(cli)?;
    let _l = crate::lock::for_reading(&repo, "check", LOCK_WAIT)?;
    let r = crate::check::check(&repo, *read_data, tty())?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for n in &r.notes {
            eprintln!("note: {n}");
        }
        for e in &r.errors {
            eprintln!("error: {e}");
        }
        for s in &r.damaged_snapshots {
            eprintln!("damaged snapshot: {s}");
        }
        println!(
            "checked {} repository ({}), {} snapshots, {} layers, {} packs{}: {}",
            r.protection,
            if r.protection == "encrypted" {
                format!("{} keys", r.keys)
            } else {
                "no keys".to_string()
            },
            r.snapshots,
            r.layers,
            r.packs,
            if *read_data {
                format!(", {} bytes read", r.bytes_read)
            } else {
                String::new()
            },
            if r.errors.is_empty() {
                "no errors".to_string()
            } else {
                format!("{} errors", r.errors.len())
            }
        );
    }
    if !r.errors.is_empty() {
        return Err(Failure::new(
            Kind::Damaged,
            format!(
                "repository has {} errors affecting {} snapshots (see above)",
                r.errors.len(),
                r.damaged_snapshots.len()
            ),
        )
        .into());
    }
    Ok(())
}

const LOCK_WAIT: Duration = Duration::from_secs(60);

fn apply_policy(v: &Volume, repo: &Repo, prune: bool) -> Result<()> {
    let Some(policy) = v.st.policy.clone().filter(|p| !p.is_empty()) else {
        bail!(
            "volume {} has no retention policy: set one with `laybak policy {} --keep-daily 7 ...`",
            v.st.name,
            v.st.path.display()
        );
    };
    volume::check_protection(v, repo)?;
    let report = {
        let host = Repo::hostname();
        let scope = crate::reclaim::Scope {
            volume: Some(&v.st.name),
            host: Some(&host),
        };
        crate::reclaim::forget(repo, &crate::reclaim::keep_by(policy), scope, false)?.report
    };
    volume::note_squashed(&v.state_dir, repo, &report.squashed)?;
    if prune {
        crate::reclaim::prune(repo, 0.05, false, None)?;
    }
    Ok(())
}

/// `open` opens the volume's repository. That happens before anything of
/// the volume changes, so a wrong or missing password changes nothing (an
/// unreachable repository still gets the layer sealed locally); meanwhile,
/// under the volume lock, another thread does the rotation's slow first
/// step, which changes nothing either.
fn snapshot_one(
    v: &mut Volume,
    open: &mut dyn FnMut(&Path) -> Result<Repo>,
    tags: &[String],
    wait: Duration,
    lock_wait: Duration,
) -> Result<volume::Archived> {
    let _lock = v.lock()?;
    let vol: &Volume = v;
    let repo_res = std::thread::scope(|s| {
        let early = s.spawn(|| volume::prepare_rotation(vol));
        let r = open(&vol.st.repo);
        let _ = early.join();
        r
    });
    let repo_res = match repo_res {
        Err(e) if crate::error::kind(&e) == Kind::Password => return Err(e),
        r => r,
    };
    volume::finish_interrupted(v)?;
    if let Ok(repo) = &repo_res
        && let Some(done) = volume::snapshot_unchanged(v, repo, tags, lock_wait)?
    {
        return Ok(done);
    }
    volume::prepare_merge_if_due(v)?;
    let (name, path, hooks) = (v.st.name.clone(), v.st.path.clone(), v.st.hooks.clone());
    let ((), after_failed) = crate::hooks::around(hooks.as_ref(), &name, &path, || {
        volume::rotate(v, wait, tags.to_vec())
    })?;
    let res = archive_sealed(v, repo_res, lock_wait);
    match after_failed {
        Some(e) => Err(e.context(format!(
            "the snapshot of {name} was sealed{}",
            if res.is_ok() { " and archived" } else { "" }
        ))),
        None => res,
    }
}

fn archive_sealed(
    v: &mut Volume,
    repo_res: Result<Repo>,
    lock_wait: Duration,
) -> Result<volume::Archived> {
    let repo = repo_res.with_context(|| {
        format!(
            "sealed a new layer of {}, but the repository is unavailable; it stays in the local layer store and the next `laybak snapshot` archives it",
            v.st.name
        )
    })?;
    let done = volume::archive_pending(v, &repo, tty(), lock_wait).with_context(|| {
        format!(
            "sealed a new layer of {}, but archiving failed; it stays in the local layer store and the next `laybak snapshot` archives it",
            v.st.name
        )
    })?;
    done.into_iter()
        .last()
        .ok_or_else(|| anyhow!("internal error: nothing was archived"))
}

fn run_forget(
    state_dir: &Path,
    repo: &Repo,
    keep_fn: crate::reclaim::KeepFn<'_>,
    scope: crate::reclaim::Scope<'_>,
    dry_run: bool,
    prune: Option<f64>,
    json: bool,
) -> Result<()> {
    let crate::reclaim::Forgot {
        report,
        plan,
        new_layers: layers,
    } = crate::reclaim::forget(repo, keep_fn, scope, dry_run)?;
    if !dry_run {
        volume::note_squashed(state_dir, repo, &report.squashed)?;
        // Forgotten layers must not stay readable in the local cache.
        crate::mounts::evict(state_dir, repo)?;
    }
    // What forget did is said before prune runs: a prune that then fails
    // (a busy repository) must not hide the snapshots already removed.
    let pr = prune.map(|mu| {
        crate::reclaim::prune(
            repo,
            mu,
            dry_run,
            dry_run.then_some((&plan, layers.as_slice())),
        )
    });
    if json {
        let (done, err) = match &pr {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(format!("{e:#}"))),
            None => (None, None),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"forget": report, "prune": done, "prune_error": err, "dry_run": dry_run})
            )?
        );
        return match pr {
            Some(Err(e)) => Err(e.context("forget finished (see above), prune did not")),
            _ => Ok(()),
        };
    }
    print_forget(&report, dry_run);
    match pr {
        Some(Ok(r)) => print_prune(&r, dry_run, false),
        Some(Err(e)) => Err(e.context("forget finished (see above), prune did not")),
        None => Ok(()),
    }
}

fn print_forget(report: &crate::reclaim::ForgetReport, dry_run: bool) {
    let verb = if dry_run { "would remove" } else { "removed" };
    for id in &report.remove {
        println!("{verb} snapshot {id}");
    }
    for id in &report.rewritten {
        println!(
            "{} snapshot {id} (layers squashed)",
            if dry_run { "would rewrite" } else { "rewrote" }
        );
    }
    // Squashed layers can outweigh the records removed: say "added" then,
    // never a negative "freed" (prune frees the data itself).
    let net = if report.bytes_freed >= 0 {
        format!(
            "{} bytes of records and layers {}",
            report.bytes_freed,
            if dry_run { "to free" } else { "freed" }
        )
    } else {
        format!(
            "{} bytes of squashed layers {} (prune frees the data they replace)",
            report.bytes_freed.unsigned_abs(),
            if dry_run { "to add" } else { "added" }
        )
    };
    println!(
        "{} snapshots kept, {} {}, {} new squashed layers, {net}",
        report.keep.len(),
        report.remove.len(),
        if dry_run { "to remove" } else { "removed" },
        report.new_layers.len(),
    );
}

fn print_prune(r: &crate::reclaim::PruneReport, dry_run: bool, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "{} {} bytes: {} packs deleted, {} repacked into {}, {} unindexed packs, {} layers, {} index files replaced; {} unused bytes left below the threshold",
        if dry_run { "would free" } else { "freed" },
        r.bytes_freed,
        r.packs_deleted,
        r.packs_repacked,
        r.packs_written,
        r.packs_unindexed,
        r.layers_deleted,
        r.indexes_replaced,
        r.unused_bytes_kept
    );
    Ok(())
}

fn print_snaps(done: &[volume::Archived], as_json: bool, many: bool) -> Result<()> {
    if as_json {
        let v: Vec<_> = done.iter().map(|a| snap_json(&a.id, &a.snap)).collect();
        if many {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else if let Some(one) = v.into_iter().last() {
            println!("{}", serde_json::to_string_pretty(&one)?);
        }
    } else if many {
        for a in done {
            println!("{}", a.id.hex());
        }
    } else if let Some(a) = done.last() {
        println!("{}", a.id.hex());
    }
    Ok(())
}

/// Entries of `view` under any of `paths` (and their parents); all when
/// `paths` is empty.
fn select<'a>(view: &'a View<'_>, paths: &[String]) -> Result<Vec<Item<'a>>> {
    let mut want: Vec<Vec<u8>> = Vec::new();
    for p in paths {
        let t = p.trim_matches('/').as_bytes().to_vec();
        if !layer::path_is_safe(&t) {
            bail!("--path {p:?} is not a clean relative path");
        }
        if !view.contains_key(&t) {
            bail!("--path {p:?} is not in the snapshot");
        }
        want.push(t);
    }
    let keep = |k: &[u8]| {
        want.is_empty()
            || want.iter().any(|w| {
                k == w.as_slice()
                    || w.is_empty()
                    || (k.starts_with(w) && k.get(w.len()) == Some(&b'/'))
                    || k.is_empty()
                    || (w.starts_with(k) && w.get(k.len()) == Some(&b'/'))
            })
    };
    Ok(view
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(_, m)| Item {
            entry: &m.entry,
            link: m.link_key(),
        })
        .collect())
}

fn same_content(a: &layer::Entry, b: &layer::Entry) -> bool {
    a.node == b.node && a.meta == b.meta
}

/// (added, deleted, modified) paths between two views.
pub fn diff_views(a: &View<'_>, b: &View<'_>) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut add, mut del, mut modi) = (Vec::new(), Vec::new(), Vec::new());
    for (k, mb) in b {
        match a.get(k) {
            None => add.push(layer::show(k)),
            Some(ma) if !same_content(&ma.entry, &mb.entry) => modi.push(layer::show(k)),
            _ => {}
        }
    }
    for k in a.keys() {
        if !b.contains_key(k) {
            del.push(layer::show(k));
        }
    }
    (add, del, modi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn percentages_parse() {
        assert_eq!(parse_fraction("5%"), Ok(0.05));
        assert_eq!(parse_fraction("0.5"), Ok(0.5));
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("lots").is_err());
    }
}
