//! `medfleet firmware trust install` and `trust show`: the root metadata medfleetd verifies uploads against.

use std::path::Path;

use medfleet_core::firmware::tuf;
use medfleet_proto::v1;
use serde::Serialize;

use super::{Firmware, files};
use crate::error::{Hint, InvalidInput};
use crate::output::{self, Format, time};

#[derive(Debug, Serialize)]
struct RoleView {
    role: String,
    threshold: u64,
    key_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TrustRootView {
    version: u64,
    expire_time: String,
    install_time: String,
    installed_by: String,
    targets_key_ids: Vec<String>,
    targets_threshold: u64,
    /// Every role as the root metadata states it.
    roles: Vec<RoleView>,
    root_sha256: String,
}

impl From<&v1::TrustRoot> for TrustRootView {
    fn from(root: &v1::TrustRoot) -> Self {
        let roles = tuf::root_info(root.root_json.as_bytes())
            .map(|info| {
                info.roles
                    .into_iter()
                    .map(|(role, key_ids, threshold)| RoleView {
                        role,
                        threshold,
                        key_ids,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            version: root.version,
            expire_time: time(root.expire_time.as_ref()),
            install_time: time(root.install_time.as_ref()),
            installed_by: root.installed_by.clone(),
            targets_key_ids: root.targets_key_ids.clone(),
            targets_threshold: root.targets_threshold,
            roles,
            root_sha256: medfleet_core::digest::sha256_hex(root.root_json.as_bytes()),
        }
    }
}

fn print(view: &TrustRootView) {
    println!(
        "trusted root version {} (expires {}), installed {} by {}\nsha256 {}",
        view.version, view.expire_time, view.install_time, view.installed_by, view.root_sha256
    );
    let mut table = output::table(&["ROLE", "THRESHOLD", "KEY IDS"]);
    for role in &view.roles {
        table.add_row(vec![
            role.role.clone(),
            format!("{} of {}", role.threshold, role.key_ids.len()),
            role.key_ids.join("\n"),
        ]);
    }
    println!("{table}");
}

pub(super) async fn install(api: &mut Firmware, path: &Path, out: Format) -> anyhow::Result<()> {
    let bytes = files::read("ROOT_JSON", path)?;
    // Checked here for a clear message; medfleetd checks it again, and the online keys too.
    let info = tuf::root_info(&bytes).map_err(|e| InvalidInput(format!("{}: {e}", path.display())))?;
    let root_json = String::from_utf8(bytes).map_err(|_| InvalidInput(format!("{} is not UTF-8", path.display())))?;
    let root = match api.set_trust_root(v1::SetTrustRootRequest { root_json }).await {
        Ok(root) => root.into_inner(),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            return Err(anyhow::Error::from(status).context(Hint(
                "the root's snapshot and timestamp keys must be exactly medfleetd's online keys (compare \
                 `medfleet firmware online-keys` with what `keys init` printed), and a new root version must be \
                 signed by the root keys of the current one too"
                    .into(),
            )));
        }
        Err(status) => return Err(status.into()),
    };
    let view = TrustRootView::from(&root);
    if out == Format::Json {
        return output::json(&view);
    }
    println!(
        "medfleetd now trusts root version {} of {} (expires {}). Uploads are verified against it; devices \
         verify against the root they pin (pin {} on devices that have none yet).",
        view.version,
        path.display(),
        info.expires.to_rfc3339(),
        path.display()
    );
    Ok(())
}

pub(super) async fn show(api: &mut Firmware, file: Option<&Path>, out: Format) -> anyhow::Result<()> {
    let root = api.get_trust_root(v1::GetTrustRootRequest {}).await?.into_inner();
    if let Some(file) = file {
        files::replace_public(file, root.root_json.as_bytes())?;
        if out == Format::Table {
            println!("wrote root version {} to {}", root.version, file.display());
        }
    }
    let view = TrustRootView::from(&root);
    if out == Format::Json {
        return output::json(&view);
    }
    print(&view);
    Ok(())
}
