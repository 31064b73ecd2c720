//! `cargo xtask install`: the release agent and its systemd unit, where the unit expects them.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::{build, is_root, step, workspace_root};

/// The unit in the repository, and the binary path its `ExecStart=` names.
const UNIT: &str = "deploy/systemd/tracer.service";
const UNIT_BINARY: &str = "/usr/local/bin/tracer";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Installation prefix: the agent goes to PREFIX/bin/tracer.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    prefix: PathBuf,
    /// Where the unit goes.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Stage everything under this directory instead of / (for packaging); no root needed.
    #[arg(long, value_name = "DIR")]
    destdir: Option<PathBuf>,
    /// Install this agent binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Print what would be done, and do nothing.
    #[arg(long)]
    dry_run: bool,
}

/// One file to write.
#[derive(Debug, PartialEq, Eq)]
struct Copy {
    to: PathBuf,
    mode: u32,
    contents: Contents,
}

#[derive(Debug, PartialEq, Eq)]
enum Contents {
    /// A file copied as it is.
    File(PathBuf),
    /// Text (the unit, its ExecStart pointed at the installed binary).
    Text(String),
}

pub fn run(args: Args) -> Result<()> {
    if !args.dry_run && args.destdir.is_none() && !is_root() {
        bail!("cargo xtask install must run as root (or with --destdir or --dry-run)");
    }
    let binary = match (&args.binary, args.dry_run) {
        (Some(binary), _) => binary.clone(),
        (None, true) => {
            step("would build the release agent (cargo xtask build)");
            workspace_root().join("target/release/tracer")
        }
        (None, false) => build()?,
    };
    let unit_path = workspace_root().join(UNIT);
    let unit = std::fs::read_to_string(&unit_path)
        .with_context(|| format!("cannot read {}", unit_path.display()))?;
    let copies = plan(&args, &binary, &unit)?;
    for copy in &copies {
        let what = match &copy.contents {
            Contents::File(from) => from.display().to_string(),
            Contents::Text(_) => UNIT.to_owned(),
        };
        let verb = if args.dry_run {
            "would install"
        } else {
            "installing"
        };
        step(&format!(
            "{verb} {what} as {} (mode {:o})",
            copy.to.display(),
            copy.mode
        ));
        if !args.dry_run {
            write(copy)?;
        }
    }
    if args.destdir.is_none() {
        step("then: systemctl daemon-reload && systemctl enable --now tracer");
    }
    Ok(())
}

/// What to write where: the binary under the prefix, the unit with its ExecStart pointing at it.
fn plan(args: &Args, binary: &Path, unit: &str) -> Result<Vec<Copy>> {
    let installed = args.prefix.join("bin/tracer");
    let installed_str = installed
        .to_str()
        .context("the prefix is not valid UTF-8")?;
    if !unit.contains(&format!("ExecStart={UNIT_BINARY} ")) {
        bail!("{UNIT} no longer starts {UNIT_BINARY}: update cargo xtask install");
    }
    let unit = unit.replace(
        &format!("ExecStart={UNIT_BINARY} "),
        &format!("ExecStart={installed_str} "),
    );
    let staged = |path: &Path| match &args.destdir {
        Some(destdir) => destdir.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    };
    Ok(vec![
        Copy {
            to: staged(&installed),
            mode: 0o755,
            contents: Contents::File(binary.to_path_buf()),
        },
        Copy {
            to: staged(&args.unit_dir.join("tracer.service")),
            mode: 0o644,
            contents: Contents::Text(unit),
        },
    ])
}

/// Writes next to the target and renames over it, so that a running agent's binary is replaced,
/// not overwritten in place (which fails with ETXTBSY).
fn write(copy: &Copy) -> Result<()> {
    let dir = copy.to.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let temp = copy.to.with_extension("xtask-new");
    match &copy.contents {
        Contents::File(from) => std::fs::copy(from, &temp)
            .map(|_| ())
            .with_context(|| format!("cannot copy {}", from.display()))?,
        Contents::Text(text) => std::fs::write(&temp, text)
            .with_context(|| format!("cannot write {}", temp.display()))?,
    }
    std::fs::set_permissions(
        &temp,
        std::os::unix::fs::PermissionsExt::from_mode(copy.mode),
    )
    .with_context(|| format!("cannot set the mode of {}", temp.display()))?;
    std::fs::rename(&temp, &copy.to)
        .with_context(|| format!("cannot move {} into place", copy.to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(prefix: &str, destdir: Option<&str>) -> Args {
        Args {
            prefix: prefix.into(),
            unit_dir: "/etc/systemd/system".into(),
            destdir: destdir.map(PathBuf::from),
            binary: None,
            dry_run: true,
        }
    }

    fn the_unit() -> String {
        std::fs::read_to_string(workspace_root().join(UNIT)).expect("read the unit")
    }

    #[test]
    fn default_prefix_installs_where_the_unit_expects() {
        let unit = the_unit();
        let copies = plan(&args("/usr/local", None), Path::new("t"), &unit).expect("plan");
        assert_eq!(copies[0].to, PathBuf::from(UNIT_BINARY));
        assert_eq!(copies[0].mode, 0o755);
        assert_eq!(
            copies[1].to,
            PathBuf::from("/etc/systemd/system/tracer.service")
        );
        assert_eq!(copies[1].contents, Contents::Text(unit));
    }

    #[test]
    fn other_prefix_and_destdir_rewrite_exec_start_and_stage() {
        let unit = the_unit();
        let copies = plan(
            &args("/opt/tracer", Some("/tmp/stage")),
            Path::new("t"),
            &unit,
        )
        .expect("plan");
        assert_eq!(
            copies[0].to,
            PathBuf::from("/tmp/stage/opt/tracer/bin/tracer")
        );
        assert_eq!(
            copies[1].to,
            PathBuf::from("/tmp/stage/etc/systemd/system/tracer.service")
        );
        let Contents::Text(text) = &copies[1].contents else {
            panic!("the unit is text");
        };
        assert!(
            text.contains("ExecStart=/opt/tracer/bin/tracer run "),
            "{text}"
        );
        assert!(!text.contains(&format!("ExecStart={UNIT_BINARY}")));
        assert!(plan(&args("/usr", None), Path::new("t"), "no exec start").is_err());
    }
}
