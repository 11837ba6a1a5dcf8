//! `medfleet config schema`: a model's configuration schema (JSON Schema draft 2020-12), which every change to a
//! layer affecting the model is validated against.

use medfleet_proto::v1;

use super::{Configs, SchemaCommand, read_json};
use crate::output::{self, Format};

pub(super) async fn run(api: &mut Configs, command: &SchemaCommand, out: Format) -> anyhow::Result<()> {
    match command {
        SchemaCommand::Set { model, file, comment } => {
            let schema = api
                .set_config_schema(v1::SetConfigSchemaRequest {
                    model: model.clone(),
                    schema_json: read_json(file)?,
                    comment: comment.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if out == Format::Json {
                return output::json(&serde_json::json!({
                    "model": schema.model,
                    "author": schema.author,
                    "update_time": output::time(schema.update_time.as_ref()),
                }));
            }
            println!(
                "schema of model {} stored; every later change is validated against it",
                schema.model
            );
            Ok(())
        }
        SchemaCommand::Get { model } => {
            let schema = api
                .get_config_schema(v1::GetConfigSchemaRequest { model: model.clone() })
                .await?
                .into_inner();
            if out == Format::Json {
                let value: serde_json::Value = serde_json::from_str(&schema.schema_json)?;
                return output::json(&value);
            }
            println!("{}", pretty(&schema.schema_json));
            Ok(())
        }
    }
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_owned())
}
