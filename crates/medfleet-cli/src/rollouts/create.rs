//! `medfleet rollouts create`: which devices (a selector, or a file of device ids) and the rules (waves, success
//! and halt thresholds, soak, window and time zone, clinical use, deadline), every one checked here with the parsers
//! medfleetd applies, all problems reported at once, before anything is sent.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medfleet_core::firmware::rollout::{Share, Waves};
use medfleet_core::firmware::window::Window;
use medfleet_core::registry::parse_tag_term;
use medfleet_core::validation::{check_slug, printable};
use medfleet_proto::convert::duration_to_wire;
use medfleet_proto::v1::{self, create_rollout_request::Target};

use super::Rollouts;
use super::view::{RolloutView, print_rollout};
use crate::args::parse_duration;
use crate::error::{InvalidInput, UsageError};
use crate::output::{self, Format};

/// The most device ids one `--devices` file may name (a bigger fleet is better named by a selector).
const MAX_DEVICES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ClinicalUseArg {
    /// Wait until the device is free (no patient association, idle or in maintenance).
    Defer,
    /// Wait until it is free, or until a clinician approves that device (`medfleet rollouts approve`).
    Approve,
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["select", "devices"]))]
pub(crate) struct CreateArgs {
    /// The stored image: artifact id or target name.
    #[arg(long)]
    artifact: String,
    /// Devices matching every term: model=MODEL,site=SITE,ward=SITE/WARD,tag=KEY=VALUE (tag repeatable).
    #[arg(long)]
    select: Option<String>,
    /// A file of device ids, one per line ('#' comments; '-' for stdin).
    #[arg(long)]
    devices: Option<PathBuf>,
    /// Cumulative shares of the devices per wave, growing to 100%.
    #[arg(long)]
    waves: String,
    /// A wave advances once this share of its devices succeeded [medfleetd's default: 95%].
    #[arg(long)]
    success: Option<String>,
    /// ...and held it this long, e.g. 30m [default: 0, no soak: give a canary time to show problems].
    #[arg(long, value_parser = parse_duration)]
    soak: Option<Duration>,
    /// Halt once failures exceed this share of the devices that finished [default: 5%]...
    #[arg(long)]
    halt_at: Option<String>,
    /// ...and at least this many finished [default: 3].
    #[arg(long)]
    min_executed: Option<u32>,
    /// Install only inside this window, e.g. 'Mon-Fri 02:00-05:00' [default: any time].
    #[arg(long)]
    window: Option<String>,
    /// The IANA time zone the window is read in, e.g. Europe/London [default: the time zone of each device's
    /// site, see `medfleet sites update --timezone`].
    #[arg(long)]
    timezone: Option<String>,
    /// What to do with a device in clinical use.
    #[arg(long, value_enum, default_value = "defer")]
    clinical_use: ClinicalUseArg,
    /// End the rollout this long after the start, e.g. 14d: devices not updated by then are reported
    /// deadline_passed (not counted as failures, never retried) [default: never].
    #[arg(long, value_parser = parse_duration)]
    deadline: Option<Duration>,
    /// Create it without starting it (`medfleet rollouts start` starts it).
    #[arg(long)]
    draft: bool,
    /// Show how many devices it would reach in each wave, and create nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask (at a terminal, a rollout that starts at once is shown and confirmed first).
    #[arg(long)]
    yes: bool,
    /// Why (kept with the rollout and in the audit trail).
    #[arg(short = 'm', long, default_value = "")]
    comment: String,
}

/// `model=…,site=…,ward=SITE/WARD,tag=k=v` as a selector; every term narrows, an empty one is refused.
pub(crate) fn parse_selector(text: &str) -> Result<v1::DeviceSelector, String> {
    let mut selector = v1::DeviceSelector::default();
    for term in text.split(',').map(str::trim) {
        if term.is_empty() {
            continue;
        }
        let (key, value) = term
            .split_once('=')
            .ok_or_else(|| format!("'{}' is not KEY=VALUE", printable(term)))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{key}= needs a value"));
        }
        let once = |slot: &mut String, what: &str| {
            if slot.is_empty() {
                value.clone_into(slot);
                Ok(())
            } else {
                Err(format!(
                    "{what}= is given twice (every term must match, so one {what} at most)"
                ))
            }
        };
        match key.trim() {
            "model" => once(&mut selector.hardware_id, "model")?,
            "site" => {
                check_slug(value).map_err(|e| format!("site={}: {e}", printable(value)))?;
                once(&mut selector.site, "site")?;
            }
            "ward" => {
                let valid = value
                    .split_once('/')
                    .is_some_and(|(site, ward)| check_slug(site).is_ok() && check_slug(ward).is_ok());
                if !valid {
                    return Err(format!(
                        "ward={} is not SITE/WARD, e.g. ward=stmarys/icu",
                        printable(value)
                    ));
                }
                once(&mut selector.ward, "ward")?;
            }
            "tag" => {
                let (k, v) = parse_tag_term(value)?;
                selector.tags.push(format!("{k}={v}"));
            }
            other => {
                return Err(format!(
                    "unknown key '{}': use model=, site=, ward=SITE/WARD or tag=KEY=VALUE",
                    printable(other)
                ));
            }
        }
    }
    if let (false, Some((ward_site, _))) = (selector.site.is_empty(), selector.ward.split_once('/'))
        && ward_site != selector.site
    {
        return Err(format!(
            "ward={} is not in site={}: no device could match both",
            selector.ward, selector.site
        ));
    }
    if selector == v1::DeviceSelector::default() {
        return Err("names no devices: give at least one of model=, site=, ward=, tag= (e.g. model=MX450)".into());
    }
    Ok(selector)
}

/// One device id per line; blank lines and `#` comments (whole-line or trailing) are skipped. Every bad line is
/// reported, by number.
pub(crate) fn parse_devices(text: &str) -> Result<Vec<String>, Vec<String>> {
    let mut ids: Vec<String> = Vec::new();
    let mut first_line: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let id = line.split('#').next().unwrap_or_default().trim();
        if id.is_empty() {
            continue;
        }
        if let Err(violations) = medfleet_proto::convert::device_id("device", id) {
            let reason = violations
                .iter()
                .map(|v| v.description.clone())
                .collect::<Vec<_>>()
                .join("; ");
            problems.push(format!("line {number}: {reason}"));
            continue;
        }
        let id = id.to_lowercase();
        if let Some(first) = first_line.get(&id) {
            problems.push(format!("line {number}: {id} is named on line {first} already"));
            continue;
        }
        first_line.insert(id.clone(), number);
        ids.push(id);
    }
    if problems.is_empty() && ids.is_empty() {
        problems.push("names no device ids (one per line)".into());
    }
    if ids.len() > MAX_DEVICES {
        problems.push(format!(
            "names {} devices, more than {MAX_DEVICES}: use --select",
            ids.len()
        ));
    }
    if problems.is_empty() { Ok(ids) } else { Err(problems) }
}

/// Whether `name` is a time zone this machine knows; without a time zone database nothing is refused here
/// (medfleetd checks it again).
fn check_timezone(name: &str) -> Result<(), String> {
    let db = jiff::tz::db();
    if name.trim().is_empty() {
        return Err("is empty; name an IANA time zone such as Europe/London".into());
    }
    if db.is_definitively_empty() || db.get(name).is_ok() {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not an IANA time zone such as Europe/London or UTC",
            printable(name)
        ))
    }
}

fn read_devices(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read --devices {}: {e}", path.display())).into())
}

impl CreateArgs {
    /// The request, with `--devices` read, or every problem with the flags at once (exit 3, nothing sent).
    pub(super) fn request(&self) -> anyhow::Result<v1::CreateRolloutRequest> {
        let devices_text = self.devices.as_deref().map(read_devices).transpose()?;
        self.request_from(devices_text.as_deref())
    }

    /// The request, given the content of `--devices`.
    fn request_from(&self, devices_text: Option<&str>) -> anyhow::Result<v1::CreateRolloutRequest> {
        let mut problems: Vec<String> = Vec::new();
        let mut check = |flag: &str, result: Result<(), String>| {
            if let Err(e) = result {
                problems.push(format!("{flag}: {e}"));
            }
        };
        check(
            "--artifact",
            if self.artifact.trim().is_empty() {
                Err("is empty".into())
            } else {
                Ok(())
            },
        );
        check(
            "--waves",
            Waves::parse(&self.waves).map(drop).map_err(|e| e.to_string()),
        );
        for (flag, value) in [("--success", &self.success), ("--halt-at", &self.halt_at)] {
            if let Some(value) = value {
                check(flag, Share::parse(value).map(drop).map_err(|e| e.to_string()));
            }
        }
        if self.min_executed == Some(0) {
            check("--min-executed", Err("must be 1 or more".into()));
        }
        if let Some(window) = &self.window {
            check("--window", Window::parse(window).map(drop).map_err(|e| e.to_string()));
        }
        if let Some(timezone) = &self.timezone {
            check("--timezone", check_timezone(timezone));
        }
        let mut target = None;
        if let Some(select) = &self.select {
            match parse_selector(select) {
                Ok(selector) => target = Some(Target::Selector(selector)),
                Err(e) => check("--select", Err(e)),
            }
        }
        if let (Some(path), Some(text)) = (&self.devices, devices_text) {
            match parse_devices(text) {
                Ok(device_ids) => target = Some(Target::Devices(v1::DeviceList { device_ids })),
                Err(lines) => check(&format!("--devices {}", path.display()), Err(lines.join("\n    "))),
            }
        }
        if !problems.is_empty() {
            return Err(InvalidInput(format!(
                "the rollout was not created; fix:\n  {}",
                problems.join("\n  ")
            ))
            .into());
        }
        Ok(v1::CreateRolloutRequest {
            artifact: self.artifact.trim().to_owned(),
            target,
            waves: self.waves.split(',').map(|w| w.trim().to_owned()).collect(),
            success_threshold: self.success.clone().unwrap_or_default(),
            soak: self.soak.map(duration_to_wire),
            halt_threshold: self.halt_at.clone().unwrap_or_default(),
            min_executed: self.min_executed.unwrap_or_default(),
            window: self.window.clone().unwrap_or_default(),
            timezone: self.timezone.clone().unwrap_or_default(),
            clinical_use: match self.clinical_use {
                ClinicalUseArg::Defer => v1::ClinicalUsePolicy::Defer,
                ClinicalUseArg::Approve => v1::ClinicalUsePolicy::Approve,
            }
            .into(),
            deadline: self.deadline.map(duration_to_wire),
            draft: self.draft,
            comment: self.comment.clone(),
            validate_only: false,
        })
    }
}

fn print_preview(r: &RolloutView, sizes: &[usize]) {
    println!(
        "{} (version {}) would reach {} devices in {} wave(s): {}",
        r.target_name,
        r.version,
        r.counts.targeted,
        sizes.len(),
        r.waves
            .iter()
            .zip(sizes)
            .map(|(share, n)| format!("{share} → {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

pub(super) async fn run(
    api: &mut Rollouts,
    args: &CreateArgs,
    request: v1::CreateRolloutRequest,
    out: Format,
) -> anyhow::Result<()> {
    if args.window.is_some() && args.timezone.is_none() {
        eprintln!(
            "note: --window is read in the time zone of each device's site (UTC for a site that has none set: \
             medfleet sites update SITE --timezone Europe/London)"
        );
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin()) && out != Format::Json;
    if args.dry_run || (interactive && !args.draft && !args.yes) {
        let preview = api
            .create_rollout(v1::CreateRolloutRequest {
                validate_only: true,
                ..request.clone()
            })
            .await?
            .into_inner();
        let preview = RolloutView::from(preview);
        let sizes = Waves::parse(&preview.waves.join(","))
            .map(|w| w.sizes(preview.counts.targeted as usize))
            .unwrap_or_default();
        if args.dry_run {
            if out == Format::Json {
                return output::json(&serde_json::json!({ "dry_run": true, "rollout": preview, "wave_sizes": sizes }));
            }
            print_preview(&preview, &sizes);
            println!("\nDry run: nothing was created. Run it again without --dry-run to create it.");
            return Ok(());
        }
        print_preview(&preview, &sizes);
        crate::confirm::confirm(
            &format!(
                "Start rolling {} out to {} devices now?",
                preview.target_name, preview.counts.targeted
            ),
            false,
        )?;
    }
    let rollout = RolloutView::from(api.create_rollout(request).await?.into_inner());
    if out == Format::Json {
        return output::json(&rollout);
    }
    print_rollout(&rollout);
    if rollout.state == "draft" {
        println!(
            "\nIt is a draft; start it with:\n  medfleet rollouts start {}",
            rollout.id
        );
    } else {
        println!("\nFollow it with:\n  medfleet rollouts watch {}", rollout.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_into_every_field() {
        let s = parse_selector("model=IntelliVue MX450, site=stmarys,ward=stmarys/icu,tag=owner=biomed,tag=floor=3")
            .unwrap();
        assert_eq!(s.hardware_id, "IntelliVue MX450");
        assert_eq!(s.site, "stmarys");
        assert_eq!(s.ward, "stmarys/icu");
        assert_eq!(s.tags, ["owner=biomed", "floor=3"]);
        assert_eq!(parse_selector("tag=asset=A-17").unwrap().tags, ["asset=A-17"]);
    }

    #[test]
    fn selector_mistakes_are_named() {
        for (text, needle) in [
            ("", "names no devices"),
            (" , ", "names no devices"),
            ("color=red", "unknown key 'color'"),
            ("model", "not KEY=VALUE"),
            ("model=", "needs a value"),
            ("model=a,model=b", "twice"),
            ("ward=icu", "SITE/WARD"),
            ("site=St Marys", "site="),
            ("tag=novalue", "key=value"),
            ("tag=Bad=1", "tag key"),
            ("site=a,ward=b/icu", "not in site=a"),
        ] {
            let error = parse_selector(text).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn device_files_allow_comments_and_name_bad_lines() {
        let text =
            "# ICU pilot\n6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f\n\n  7A2B3C4D-0B1A-4C5D-8E9F-0A1B2C3D4E5F  # bed 3\n";
        assert_eq!(
            parse_devices(text).unwrap(),
            [
                "6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f",
                "7a2b3c4d-0b1a-4c5d-8e9f-0a1b2c3d4e5f"
            ]
        );
        let bad = "6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f\nmonitor-7\n6F1C2D3E-0B1A-4C5D-8E9F-0A1B2C3D4E5F\n";
        let problems = parse_devices(bad).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("line 2:"), "{problems:?}");
        assert!(problems[1].contains("line 1 already"), "{problems:?}");
        assert!(parse_devices("# nothing\n\n").unwrap_err()[0].contains("no device ids"));
    }

    fn args() -> CreateArgs {
        CreateArgs {
            artifact: "mx450-41.img".into(),
            select: Some("model=MX450".into()),
            devices: None,
            waves: "1%,10%,50%,100%".into(),
            success: Some("95%".into()),
            soak: Some(Duration::from_mins(30)),
            halt_at: Some("5%".into()),
            min_executed: Some(3),
            window: Some("Mon-Fri 02:00-05:00".into()),
            timezone: Some("UTC".into()),
            clinical_use: ClinicalUseArg::Approve,
            deadline: Some(Duration::from_hours(14 * 24)),
            draft: true,
            dry_run: false,
            yes: false,
            comment: "pilot".into(),
        }
    }

    #[test]
    fn a_valid_rollout_becomes_its_request() {
        let request = args().request_from(None).unwrap();
        assert_eq!(request.waves, ["1%", "10%", "50%", "100%"]);
        assert_eq!(request.soak.unwrap().seconds, 1800);
        assert_eq!(request.clinical_use, i32::from(v1::ClinicalUsePolicy::Approve));
        assert!(matches!(request.target, Some(Target::Selector(s)) if s.hardware_id == "MX450"));
        let mut from_file = args();
        from_file.select = None;
        from_file.devices = Some("pilot.txt".into());
        let request = from_file
            .request_from(Some("6f1c2d3e-0b1a-4c5d-8e9f-0a1b2c3d4e5f\n"))
            .unwrap();
        assert!(matches!(request.target, Some(Target::Devices(d)) if d.device_ids.len() == 1));
    }

    #[test]
    fn every_bad_flag_is_named_at_once() {
        let mut bad = args();
        bad.waves = "10%,5%".into();
        bad.success = Some("95".into());
        bad.halt_at = Some("101%".into());
        bad.min_executed = Some(0);
        bad.window = Some("weekdays at night".into());
        bad.select = Some("colour=red".into());
        let error = bad.request_from(None).unwrap_err();
        assert!(error.downcast_ref::<InvalidInput>().is_some());
        let text = error.to_string();
        for flag in [
            "--waves",
            "--success",
            "--halt-at",
            "--min-executed",
            "--window",
            "--select",
        ] {
            assert!(text.contains(flag), "{flag} missing from: {text}");
        }
    }
}
