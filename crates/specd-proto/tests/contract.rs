//! Guards on the wire contracts themselves, checked through the generated descriptor set:
//! every element is documented, and field numbers, types and labels only change deliberately.

use std::{fmt::Write as _, path::PathBuf};

use prost::Message as _;
use prost_types::{
    field_descriptor_proto::{Label, Type},
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
};

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(specd_proto::FILE_DESCRIPTOR_SET)
        .expect("FILE_DESCRIPTOR_SET decodes")
}

// Field numbers of descriptor.proto, used to build source-code-info paths.
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const MESSAGE_ONEOF_DECL: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn index(i: usize) -> i32 {
    i32::try_from(i).expect("descriptor index fits in i32")
}

/// Collects `(source path, name)` of every element that must carry a comment.
struct Elements(Vec<(Vec<i32>, String)>);

impl Elements {
    fn message(&mut self, path: Vec<i32>, scope: &str, msg: &DescriptorProto) {
        let name = format!("{scope}.{}", msg.name());
        for (i, f) in msg.field.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_FIELD, index(i)]);
            self.0.push((p, format!("{name}.{}", f.name())));
        }
        for (i, o) in msg.oneof_decl.iter().enumerate() {
            // proto3 `optional` fields get synthetic oneofs named `_field`; they have no source.
            if o.name().starts_with('_') {
                continue;
            }
            let mut p = path.clone();
            p.extend([MESSAGE_ONEOF_DECL, index(i)]);
            self.0.push((p, format!("{name}.{} (oneof)", o.name())));
        }
        for (i, nested) in msg.nested_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_NESTED_TYPE, index(i)]);
            self.message(p, &name, nested);
        }
        for (i, e) in msg.enum_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_ENUM_TYPE, index(i)]);
            self.enumeration(p, &name, e);
        }
        self.0.push((path, name));
    }

    fn enumeration(&mut self, path: Vec<i32>, scope: &str, e: &EnumDescriptorProto) {
        let name = format!("{scope}.{}", e.name());
        for (i, v) in e.value.iter().enumerate() {
            let mut p = path.clone();
            p.extend([ENUM_VALUE, index(i)]);
            self.0.push((p, format!("{name}.{}", v.name())));
        }
        self.0.push((path, name));
    }

    fn file(&mut self, f: &FileDescriptorProto) {
        let pkg = f.package();
        for (i, m) in f.message_type.iter().enumerate() {
            self.message(vec![FILE_MESSAGE_TYPE, index(i)], pkg, m);
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            self.enumeration(vec![FILE_ENUM_TYPE, index(i)], pkg, e);
        }
        for (i, s) in f.service.iter().enumerate() {
            let name = format!("{pkg}.{}", s.name());
            for (j, m) in s.method.iter().enumerate() {
                self.0.push((
                    vec![FILE_SERVICE, index(i), SERVICE_METHOD, index(j)],
                    format!("{name}/{}", m.name()),
                ));
            }
            self.0.push((vec![FILE_SERVICE, index(i)], name));
        }
    }
}

/// These are user-facing contracts: every service, method, message, field, oneof, enum and enum
/// value carries a leading comment.
#[test]
fn every_element_is_documented() {
    let mut undocumented = Vec::new();
    for f in descriptor_set().file {
        let info = f
            .source_code_info
            .clone()
            .expect("descriptor set keeps source info");
        let mut elements = Elements(Vec::new());
        elements.file(&f);
        for (path, name) in elements.0 {
            let documented = info
                .location
                .iter()
                .any(|l| l.path == path && !l.leading_comments().trim().is_empty());
            if !documented {
                undocumented.push(name);
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "undocumented proto elements: {undocumented:#?}"
    );
}

fn field_type(f: &prost_types::FieldDescriptorProto) -> String {
    match f.r#type() {
        Type::Message | Type::Enum => f.type_name().to_owned(),
        t => t
            .as_str_name()
            .trim_start_matches("TYPE_")
            .to_ascii_lowercase(),
    }
}

fn describe_message(out: &mut String, scope: &str, msg: &DescriptorProto) {
    let name = format!("{scope}.{}", msg.name());
    writeln!(out, "message {name}").expect("write to String");
    for f in &msg.field {
        let label = if f.proto3_optional() {
            "optional "
        } else if f.label() == Label::Repeated {
            "repeated "
        } else {
            ""
        };
        let oneof = match f.oneof_index {
            Some(i) if !f.proto3_optional() => {
                let idx = usize::try_from(i).expect("oneof index is non-negative");
                format!(" (oneof {})", msg.oneof_decl[idx].name())
            }
            _ => String::new(),
        };
        writeln!(
            out,
            "  {} = {}: {label}{}{oneof}",
            f.name(),
            f.number(),
            field_type(f)
        )
        .expect("write to String");
    }
    for nested in &msg.nested_type {
        describe_message(out, &name, nested);
    }
    for e in &msg.enum_type {
        describe_enum(out, &name, e);
    }
}

fn describe_enum(out: &mut String, scope: &str, e: &EnumDescriptorProto) {
    writeln!(out, "enum {scope}.{}", e.name()).expect("write to String");
    for v in &e.value {
        writeln!(out, "  {} = {}", v.name(), v.number()).expect("write to String");
    }
}

/// The wire shape of every message and enum (names, numbers, types, labels), one line per item.
fn wire_shape() -> String {
    let mut files = descriptor_set().file;
    files.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::new();
    for f in &files {
        writeln!(out, "# {}", f.name()).expect("write to String");
        for m in &f.message_type {
            describe_message(&mut out, f.package(), m);
        }
        for e in &f.enum_type {
            describe_enum(&mut out, f.package(), e);
        }
    }
    out
}

/// Field numbers, types and labels are the wire contract: they must not change by accident.
/// After a deliberate, compatible change (adding fields, reserving removed ones), regenerate the
/// snapshot with `SPECD_UPDATE_WIRE_SNAPSHOT=1 cargo test -p specd-proto --test contract` and
/// review the diff.
#[test]
fn wire_shape_matches_snapshot() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/wire_shape.txt");
    let actual = wire_shape();
    if std::env::var_os("SPECD_UPDATE_WIRE_SNAPSHOT").is_some() {
        std::fs::write(&path, &actual).expect("write wire snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).expect("read tests/wire_shape.txt");
    assert!(
        actual == expected,
        "wire shape changed; if deliberate and compatible, rerun with \
         SPECD_UPDATE_WIRE_SNAPSHOT=1 and review the diff.\n--- actual ---\n{actual}"
    );
}

/// Presence of `optional` fields and the oneofs survives an encode/decode round trip.
#[test]
fn optional_and_oneof_round_trip() {
    use specd_proto::v1::{
        generate_request::Input, FinishReason, GenerateRequest, GenerateStreamResponse,
    };

    let req = GenerateRequest {
        model: "m".into(),
        input: Some(Input::Prompt("hello".into())),
        max_new_tokens: 8,
        temperature: Some(0.0),
        top_k: None,
        draft_len: Some(0),
        stop: vec!["\n\n".into()],
        ..Default::default()
    };
    let back = GenerateRequest::decode(req.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(back, req);
    assert_eq!(
        back.temperature,
        Some(0.0),
        "an explicit 0 stays distinguishable from absence"
    );
    assert_eq!(back.draft_len, Some(0));
    assert_eq!(back.top_k, None);

    let last = GenerateStreamResponse {
        finish_reason: Some(FinishReason::Unspecified.into()),
        ..Default::default()
    };
    let back = GenerateStreamResponse::decode(last.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(back.finish_reason(), FinishReason::Unspecified);
    assert!(back.finish_reason.is_some());
    let delta = GenerateStreamResponse::decode(
        GenerateStreamResponse {
            text_delta: "x".into(),
            ..Default::default()
        }
        .encode_to_vec()
        .as_slice(),
    )
    .expect("decodes");
    assert!(
        delta.finish_reason.is_none(),
        "non-final stream messages carry no finish_reason"
    );
}

/// The internal streams' oneofs carry each message kind.
#[test]
fn worker_stream_messages_round_trip() {
    use specd_proto::internal::v1::{
        draft_request, verify_response, DraftRequest, SamplingParams, SparseDist, StepFeedback,
        VerifyResponse,
    };

    let open = DraftRequest {
        msg: Some(draft_request::Msg::Open(draft_request::Open {
            sequence_id: "s1".into(),
            drafter_kind: "ngram".into(),
            prompt_ids: vec![1, 2, 3],
            sampling: Some(SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                seed: Some(7),
            }),
        })),
    };
    assert_eq!(
        DraftRequest::decode(open.encode_to_vec().as_slice()).expect("decodes"),
        open
    );

    let close = DraftRequest {
        msg: Some(draft_request::Msg::Close(draft_request::Close {})),
    };
    let back = DraftRequest::decode(close.encode_to_vec().as_slice()).expect("decodes");
    assert!(
        matches!(back.msg, Some(draft_request::Msg::Close(_))),
        "an empty oneof member is still present"
    );

    let step = VerifyResponse {
        msg: Some(verify_response::Msg::StepResult(
            verify_response::StepResult {
                accepted: 2,
                next_token: 9,
                emitted: vec![4, 5, 9],
                verify_ms: 1.5,
                feedback: Some(StepFeedback {
                    inputs: vec![3, 4, 5],
                    width: 2,
                    target_top: vec![4, 7, 5, 1, 9, 2],
                }),
                draft_row_cost: 0.25,
            },
        )),
    };
    assert_eq!(
        VerifyResponse::decode(step.encode_to_vec().as_slice()).expect("decodes"),
        step
    );

    let q = SparseDist {
        ids: vec![4],
        probs: vec![1.0],
    };
    assert_eq!(
        SparseDist::decode(q.encode_to_vec().as_slice()).expect("decodes"),
        q
    );
}

/// The generated clients are usable with tonic's transport channel.
#[test]
fn clients_are_generated_for_channels() {
    fn assert_client<T>() {}
    assert_client::<specd_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>>(
    );
    assert_client::<
        specd_proto::internal::v1::drafter_client::DrafterClient<tonic::transport::Channel>,
    >();
    assert_client::<
        specd_proto::internal::v1::target_client::TargetClient<tonic::transport::Channel>,
    >();
    assert_client::<
        specd_proto::internal::v1::trainer_client::TrainerClient<tonic::transport::Channel>,
    >();
}
