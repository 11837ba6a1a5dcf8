//! `medfleet wards`: the wards of a site and their beds — create, list, show, change — and how a ward is shown.

use clap::Subcommand;
use medfleet_proto::v1::{self, registry_service_client::RegistryServiceClient};
use serde::Serialize;
use tonic::transport::Channel;

use crate::args::{mask, split_scope};
use crate::error::UsageError;
use crate::output::{self, Format, time};
use crate::pager::{self, Page};

#[derive(Debug, Subcommand)]
pub(crate) enum WardCommand {
    /// Create a ward in a site.
    #[command(
        after_help = "Example:\n  medfleet wards create stmarys/icu --display-name \"Intensive Care\" --beds 1,2,3,4"
    )]
    Create {
        /// SITE/WARD
        scope: String,
        #[arg(long)]
        display_name: String,
        /// Bed labels, comma-separated.
        #[arg(long, value_delimiter = ',')]
        beds: Vec<String>,
    },
    /// List the wards of a site.
    #[command(after_help = "Example:\n  medfleet wards list stmarys")]
    List { site: String },
    /// Show one ward with its beds.
    #[command(after_help = "Example:\n  medfleet wards show stmarys/icu")]
    Show { scope: String },
    /// Change a ward's display name and/or its beds (the bed list is replaced).
    #[command(after_help = "Example:\n  medfleet wards update stmarys/icu --beds 1,2,3,4,5")]
    Update {
        scope: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long, value_delimiter = ',')]
        beds: Option<Vec<String>>,
    },
}

#[derive(Debug, Serialize)]
struct WardView {
    site: String,
    name: String,
    display_name: String,
    beds: Vec<String>,
    create_time: String,
    update_time: String,
}

impl From<v1::Ward> for WardView {
    fn from(w: v1::Ward) -> Self {
        Self {
            create_time: time(w.create_time.as_ref()),
            update_time: time(w.update_time.as_ref()),
            site: w.site,
            name: w.name,
            display_name: w.display_name,
            beds: w.beds,
        }
    }
}

pub(crate) async fn run(channel: Channel, command: &WardCommand, out: Format) -> anyhow::Result<()> {
    let mut api = RegistryServiceClient::new(channel);
    match command {
        WardCommand::Create {
            scope,
            display_name,
            beds,
        } => {
            let (site, name) = split_scope(scope)?;
            let ward = api
                .create_ward(v1::CreateWardRequest {
                    ward: Some(v1::Ward {
                        site,
                        name,
                        display_name: display_name.clone(),
                        beds: beds.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            show(out, &ward.into())
        }
        WardCommand::List { site } => {
            let all = pager::collect(None, async |page_size, page_token| {
                let page = api
                    .list_wards(v1::ListWardsRequest {
                        site: site.clone(),
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok(Page::new(page.wards, page.next_page_token))
            })
            .await?;
            list(out, &all.into_iter().map(WardView::from).collect::<Vec<_>>())
        }
        WardCommand::Show { scope } => {
            let (site, name) = split_scope(scope)?;
            let ward = api.get_ward(v1::GetWardRequest { site, name }).await?.into_inner();
            show(out, &ward.into())
        }
        WardCommand::Update {
            scope,
            display_name,
            beds,
        } => {
            let (site, name) = split_scope(scope)?;
            let mut paths = Vec::new();
            if display_name.is_some() {
                paths.push("display_name");
            }
            if beds.is_some() {
                paths.push("beds");
            }
            if paths.is_empty() {
                return Err(UsageError("nothing to change: give --display-name and/or --beds".into()).into());
            }
            let ward = api
                .update_ward(v1::UpdateWardRequest {
                    ward: Some(v1::Ward {
                        site,
                        name,
                        display_name: display_name.clone().unwrap_or_default(),
                        beds: beds.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                    update_mask: Some(mask(&paths)),
                })
                .await?
                .into_inner();
            show(out, &ward.into())
        }
    }
}

fn list(format: Format, wards: &[WardView]) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(wards);
    }
    let mut t = output::table(&["SCOPE", "DISPLAY NAME", "BEDS"]);
    for w in wards {
        t.add_row(vec![
            format!("{}/{}", w.site, w.name),
            w.display_name.clone(),
            w.beds.len().to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn show(format: Format, ward: &WardView) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(ward);
    }
    println!(
        "ward:     {}/{}\nname:     {}\nbeds:     {}\ncreated:  {}\nupdated:  {}",
        ward.site,
        ward.name,
        ward.display_name,
        if ward.beds.is_empty() {
            "(none)".to_owned()
        } else {
            ward.beds.join(", ")
        },
        ward.create_time,
        ward.update_time
    );
    Ok(())
}
