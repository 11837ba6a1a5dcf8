//! `medfleet sites`: the hospital campuses at the top of the location tree — create, list, show, rename, set the
//! time zone — and how a site is shown.

use clap::Subcommand;
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::mask;
use crate::output::{self, Format, time};
use crate::pager::{self, Page};

#[derive(Debug, Subcommand)]
pub(crate) enum SiteCommand {
    /// Create a site.
    #[command(
        after_help = "Example:\n  medfleet sites create stmarys --display-name \"St Mary's Hospital\" --timezone Europe/London"
    )]
    Create {
        /// Short name: lowercase letters, digits and '-'.
        name: String,
        #[arg(long)]
        display_name: String,
        /// IANA time zone of the campus; rollouts' maintenance windows are read in it (default: UTC).
        #[arg(long)]
        timezone: Option<String>,
    },
    /// List all sites.
    #[command(after_help = "Example:\n  medfleet sites list -o json")]
    List,
    /// Show one site.
    #[command(after_help = "Example:\n  medfleet sites show stmarys")]
    Show { name: String },
    /// Change a site's display name or time zone.
    #[command(
        after_help = "Examples:\n  medfleet sites update stmarys --display-name \"St Mary's\"\n  \
        medfleet sites update stmarys --timezone Europe/London"
    )]
    Update {
        name: String,
        #[arg(long, required_unless_present = "timezone")]
        display_name: Option<String>,
        /// IANA time zone of the campus, e.g. Europe/London.
        #[arg(long)]
        timezone: Option<String>,
    },
}

#[derive(Debug, Serialize)]
struct SiteView {
    name: String,
    display_name: String,
    timezone: String,
    create_time: String,
    update_time: String,
}

impl From<v1::Site> for SiteView {
    fn from(s: v1::Site) -> Self {
        Self {
            create_time: time(s.create_time.as_ref()),
            update_time: time(s.update_time.as_ref()),
            name: s.name,
            display_name: s.display_name,
            timezone: s.timezone,
        }
    }
}

pub(crate) async fn run(channel: Channel, command: &SiteCommand, out: Format) -> anyhow::Result<()> {
    let mut api = RegistryServiceClient::new(channel);
    match command {
        SiteCommand::Create {
            name,
            display_name,
            timezone,
        } => {
            let site = api
                .create_site(v1::CreateSiteRequest {
                    site: Some(v1::Site {
                        name: name.clone(),
                        display_name: display_name.clone(),
                        timezone: timezone.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            show(out, &site.into())
        }
        SiteCommand::List => {
            let all = pager::collect(None, async |page_size, page_token| {
                let page = api
                    .list_sites(v1::ListSitesRequest { page_size, page_token })
                    .await?
                    .into_inner();
                Ok(Page::new(page.sites, page.next_page_token))
            })
            .await?;
            list(out, &all.into_iter().map(SiteView::from).collect::<Vec<_>>())
        }
        SiteCommand::Show { name } => {
            let site = api
                .get_site(v1::GetSiteRequest { name: name.clone() })
                .await?
                .into_inner();
            show(out, &site.into())
        }
        SiteCommand::Update {
            name,
            display_name,
            timezone,
        } => {
            let mut fields = Vec::new();
            if display_name.is_some() {
                fields.push("display_name");
            }
            if timezone.is_some() {
                fields.push("timezone");
            }
            let site = api
                .update_site(v1::UpdateSiteRequest {
                    site: Some(v1::Site {
                        name: name.clone(),
                        display_name: display_name.clone().unwrap_or_default(),
                        timezone: timezone.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                    update_mask: Some(mask(&fields)),
                })
                .await?
                .into_inner();
            show(out, &site.into())
        }
    }
}

fn list(format: Format, sites: &[SiteView]) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(sites);
    }
    let mut t = output::table(&["NAME", "DISPLAY NAME", "TIME ZONE", "CREATED"]);
    for s in sites {
        t.add_row(vec![
            s.name.as_str(),
            s.display_name.as_str(),
            s.timezone.as_str(),
            s.create_time.as_str(),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn show(format: Format, site: &SiteView) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(site);
    }
    println!(
        "site:      {}\nname:      {}\ntime zone: {}\ncreated:   {}\nupdated:   {}",
        site.name, site.display_name, site.timezone, site.create_time, site.update_time
    );
    Ok(())
}
