//! The OpenAPI 3.1 document served at `/openapi.json`: the routes' own declarations (their
//! paths, parameters, bodies and answers, derived from the handlers and the types they take
//! and give), completed here with what every route shares — the security schemes, and the
//! error answers the layers in front of every route can give, each status described by the
//! error codes it carries, from the core error table.

use super::views::ErrorBody;
use serde_json::{json, Value};
use sparkle_core::ErrorCode;
use sparkle_core::{Catalog, Limits};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HeaderBuilder, InfoBuilder, LicenseBuilder, ObjectBuilder,
    OpenApi, Ref, RefOr, ResponseBuilder, Type,
};
use utoipa::{PartialSchema, ToSchema};

const DESCRIPTION: &str = "Sparkle makes images with Stable Diffusion. Submit a job \
(`POST /v1/jobs`), follow it (`GET /v1/jobs/{id}/events`), fetch its PNGs; or call OpenAI's \
images API (`POST /v1/images/generations`) with an official client.\n\n\
Authenticate with an API key as `Authorization: Bearer spk_…`, or, from a browser, with the \
session cookie `POST /v1/session` sets; a signed-in request that changes something sends the \
session's `csrf_token` as `X-CSRF-Token`.\n\n\
Every error is answered in OpenAI's error shape, `{\"error\": {\"message\", \"type\", \
\"param\", \"code\"}}`, with a stable `code`; each error answer below lists the codes of its \
status. Answers with `Retry-After` say when to try again.";

/// Answers every route can give, whatever it does: a slow client, too many requests from one
/// address or too many connections, and a failure inside.
const EVERY_ROUTE: &[u16] = &[408, 429, 500, 503];
/// Answers of routes that need a key or a session (besides [`EVERY_ROUTE`]'s).
const AUTHENTICATED: &[u16] = &[401, 403];
/// Answers of routes that read a JSON body.
const WITH_BODY: &[u16] = &[400, 413, 415];

/// The document, completed.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title("Sparkle")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(DESCRIPTION))
        .license(Some(
            LicenseBuilder::new()
                .name("See the project's license")
                .build(),
        ))
        .build();
    let mut schemas = vec![(ErrorBody::name().into_owned(), ErrorBody::schema())];
    ErrorBody::schemas(&mut schemas);
    let mut components = doc.components.take().unwrap_or_default();
    for (name, schema) in schemas {
        components.schemas.entry(name).or_insert(schema);
    }
    let extra = ComponentsBuilder::new()
        .security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`spk_…`), made with `sparkle keys create`",
                    ))
                    .build(),
            ),
        )
        .security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::auth::SESSION_COOKIE,
                "A browser session from `POST /v1/session` (HttpOnly, Secure, SameSite=Strict); \
                 requests that change something also send `X-CSRF-Token`",
            ))),
        )
        .build();
    components.security_schemes.extend(extra.security_schemes);
    doc.components = Some(components);
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            complete(operation);
        }
    }
    doc
}

/// The document as this deployment serves it: the request limits it enforces and the models
/// it serves written into the request schema, so a client (or a fuzzer) knows them.
pub fn for_deployment(doc: OpenApi, limits: &Limits, catalog: &Catalog) -> Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    let fields = &mut doc["components"]["schemas"]["GenerationBody"]["properties"];
    let mut limit = |field: &str, extra: Value| {
        if let (Some(schema), Value::Object(extra)) = (fields.get_mut(field), extra) {
            if let Some(schema) = schema.as_object_mut() {
                schema.extend(extra);
            }
        }
    };
    limit(
        "prompt",
        json!({"minLength": 1, "maxLength": limits.max_prompt_chars, "pattern": "\\S"}),
    );
    limit(
        "negative_prompt",
        json!({"maxLength": limits.max_prompt_chars}),
    );
    limit(
        "steps",
        json!({"minimum": limits.min_steps, "maximum": limits.max_steps}),
    );
    limit("n", json!({"minimum": 1, "maximum": limits.max_n}));
    limit(
        "guidance_scale",
        json!({"minimum": 0, "maximum": limits.max_guidance_scale}),
    );
    limit("seed", json!({"minimum": 0, "maximum": u32::MAX}));
    limit("strength", json!({"exclusiveMinimum": 0, "maximum": 1}));
    limit(
        "size",
        json!({
            "pattern": "^[0-9]+x[0-9]+$",
            "description": format!(
                "`WIDTHxHEIGHT`, each a multiple of 8 from {} to {} (default: the model's)",
                limits.min_side, limits.max_side
            ),
        }),
    );
    let models: Vec<&str> = catalog.models.iter().map(|m| m.name.as_str()).collect();
    limit("model", json!({"enum": models}));
    doc
}

/// Adds the error answers every route of its kind can give, and describes each error answer
/// by its codes.
fn complete(operation: &mut Operation) {
    let authenticated = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let with_body = operation
        .request_body
        .as_ref()
        .is_some_and(|b| b.content.contains_key("application/json"));
    let mut statuses: Vec<u16> = EVERY_ROUTE.to_vec();
    if authenticated {
        statuses.extend_from_slice(AUTHENTICATED);
    }
    if with_body {
        statuses.extend_from_slice(WITH_BODY);
    }
    let responses = &mut operation.responses.responses;
    for status in statuses {
        responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(ResponseBuilder::new().build()));
    }
    for (status, response) in responses.iter_mut() {
        let Ok(status) = status.parse::<u16>() else {
            continue;
        };
        let RefOr::T(response) = response else {
            continue;
        };
        // An answer declared with its own words (Discord's) is kept as declared.
        if status < 400 || !response.description.is_empty() {
            continue;
        }
        *response = error_response(status);
    }
}

/// An error answer of `status`: the error body, and the codes it carries.
fn error_response(status: u16) -> utoipa::openapi::Response {
    let codes: Vec<&str> = ErrorCode::ALL
        .iter()
        .filter(|c| c.http_status() == status)
        .map(|c| c.as_str())
        .collect();
    let mut builder = ResponseBuilder::new()
        .description(format!("Codes: `{}`", codes.join("`, `")))
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                .build(),
        );
    if matches!(status, 429 | 503) {
        builder = builder.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer))
                .description(Some("Seconds to wait before trying again"))
                .build(),
        );
    }
    if status == 401 {
        builder = builder.header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .build(),
        );
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::fixture::*;
    use axum::http::StatusCode;

    #[tokio::test]
    async fn the_document_is_served_without_a_key_and_covers_every_route_and_code() {
        let f = fixture().await;
        let answer = f.send("GET", "/openapi.json", false, "").await;
        assert_eq!(answer.status(), StatusCode::OK);
        let doc = json_of(answer).await;
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{}",
            doc["openapi"]
        );
        let routes = [
            ("post", "/v1/images/generations"),
            ("post", "/v1/images/edits"),
            ("get", "/v1/models"),
            ("get", "/v1/models/{model}"),
            ("post", "/v1/jobs"),
            ("get", "/v1/jobs"),
            ("get", "/v1/jobs/{id}"),
            ("delete", "/v1/jobs/{id}"),
            ("get", "/v1/jobs/{id}/events"),
            ("get", "/v1/jobs/{id}/images/{n}"),
            ("post", "/v1/session"),
            ("get", "/v1/session"),
            ("delete", "/v1/session"),
            ("post", "/discord/interactions"),
            ("get", "/healthz"),
            ("get", "/readyz"),
        ];
        for (method, path) in routes {
            let op = &doc["paths"][path][method];
            assert!(op.is_object(), "{method} {path} is described");
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path} succeeds"
            );
            for status in ["429", "500", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} answers {status}"
                );
            }
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                assert!(responses.contains_key("401"), "{method} {path} answers 401");
            }
        }
        // Every route the router answers is described: its paths are exactly these.
        let described: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected: Vec<&str> = routes.iter().map(|(_, p)| *p).collect();
        expected.dedup();
        let mut sorted = described.clone();
        sorted.sort();
        expected.sort();
        expected.dedup();
        assert_eq!(sorted, expected);

        let text = doc.to_string();
        for code in ErrorCode::ALL {
            assert!(
                text.contains(&format!("`{}`", code.as_str())),
                "{} is described",
                code.as_str()
            );
        }
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        assert_eq!(codes.as_array().map(Vec::len), Some(ErrorCode::ALL.len()));
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["session"]["in"], "cookie");
        assert_eq!(schemes["session"]["name"], "__Host-sparkle_session");
        let events = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"];
        assert!(events.get("text/event-stream").is_some(), "{events}");
        let png = &doc["paths"]["/v1/jobs/{id}/images/{n}"]["get"]["responses"]["200"]["content"];
        assert!(png.get("image/png").is_some(), "{png}");
        let body = &doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/GenerationBody");
        let fields = &doc["components"]["schemas"]["GenerationBody"]["properties"];
        for field in [
            "prompt",
            "negative_prompt",
            "model",
            "size",
            "steps",
            "guidance_scale",
            "seed",
            "scheduler",
            "n",
            "user",
            "webhook_url",
            "response_format",
        ] {
            assert!(fields.get(field).is_some(), "{field}");
        }
        assert!(fields.get("other").is_none());
        // Every reference resolves.
        fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        match (k.as_str(), v) {
                            ("$ref", Value::String(r)) => out.push(r),
                            _ => refs(v, out),
                        }
                    }
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        refs(&doc, &mut found);
        for r in found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("a schema reference");
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} resolves"
            );
        }
    }

    #[test]
    fn every_error_status_names_codes() {
        for code in ErrorCode::ALL {
            let response = error_response(code.http_status());
            assert!(
                response.description.contains(code.as_str()),
                "{} under {}",
                code.as_str(),
                code.http_status()
            );
        }
    }
}
