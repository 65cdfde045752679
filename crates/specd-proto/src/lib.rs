//! specd's wire contracts: the protobuf messages and the gRPC clients and servers generated from the
//! `.proto` files in the workspace's `proto/` directory.
//!
//! This crate owns the wire formats and nothing else: it is the only place prost messages are derived,
//! and it holds no logic (no validation, conversion, defaults or service behaviour; those live in the
//! crates that use it). The `.proto` files are the source of truth and document every field.
//!
//! - [`v1`] (`specd.v1`): the public API served by the router, service `Generation`.
//! - [`internal::v1`] (`specd.internal.v1`): router to worker streams (services `Drafter` and `Target`)
//!   and the trainer (service `Trainer`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of all of the above, for gRPC server reflection.
//! - [`codec::SpecdCodec`]: prost encoding, with undecodable messages (such as invalid UTF-8 in a
//!   string field) answered INVALID_ARGUMENT naming the field instead of tonic's INTERNAL.
//!
//! Each service `Foo` generates a client `foo_client::FooClient` and a server `foo_server::FooServer`
//! with its trait `foo_server::Foo`.

pub mod codec;

/// The public API (`specd.v1`), served by the router.
pub mod v1 {
    tonic::include_proto!("specd.v1");
}

/// Internal APIs between specd services. Only specd components speak them.
pub mod internal {
    /// Version 1 of the internal APIs (`specd.internal.v1`): drafter, target and trainer services.
    pub mod v1 {
        tonic::include_proto!("specd.internal.v1");
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of every specd proto file, including source comments.
///
/// Register it with gRPC server reflection (tonic-reflection's `register_encoded_file_descriptor_set`,
/// for both the v1 and the v1alpha reflection services) so that tools such as grpcurl and ghz can
/// discover the services without the `.proto` files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("specd_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::FILE_DESCRIPTOR_SET;

    fn descriptor_set() -> FileDescriptorSet {
        FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes")
    }

    /// Fully qualified names (`package.Service`) of every service in the descriptor set.
    fn service_names(set: &FileDescriptorSet) -> Vec<String> {
        set.file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect()
    }

    #[test]
    fn descriptor_set_holds_every_service() {
        let set = descriptor_set();
        let names = service_names(&set);
        for expected in [
            "specd.v1.Generation",
            "specd.internal.v1.Drafter",
            "specd.internal.v1.Target",
            "specd.internal.v1.Trainer",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        assert_eq!(names.len(), 4, "unexpected services: {names:?}");
    }

    #[test]
    fn descriptor_set_holds_every_file_with_comments() {
        let set = descriptor_set();
        let mut files: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        files.sort_unstable();
        assert_eq!(
            files,
            [
                "specd/internal/v1/trainer.proto",
                "specd/internal/v1/worker.proto",
                "specd/v1/generation.proto",
            ]
        );
        // Source info (comments) is kept so reflection clients can show the docs.
        assert!(set.file.iter().all(|f| f.source_code_info.is_some()));
    }

    #[test]
    fn service_methods_match_the_contract() {
        let set = descriptor_set();
        let mut methods: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service.iter().flat_map(move |s| {
                    s.method.iter().map(move |m| {
                        format!(
                            "{}.{}/{}({}{}) -> {}{}",
                            f.package(),
                            s.name(),
                            m.name(),
                            if m.client_streaming() { "stream " } else { "" },
                            m.input_type(),
                            if m.server_streaming() { "stream " } else { "" },
                            m.output_type(),
                        )
                    })
                })
            })
            .collect();
        methods.sort_unstable();
        let expected = [
            "specd.internal.v1.Drafter/Draft(stream .specd.internal.v1.DraftRequest) -> stream .specd.internal.v1.DraftResponse",
            "specd.internal.v1.Drafter/Info(.specd.internal.v1.InfoRequest) -> .specd.internal.v1.WorkerInfo",
            "specd.internal.v1.Target/Info(.specd.internal.v1.InfoRequest) -> .specd.internal.v1.WorkerInfo",
            "specd.internal.v1.Target/Verify(stream .specd.internal.v1.VerifyRequest) -> stream .specd.internal.v1.VerifyResponse",
            "specd.internal.v1.Trainer/FetchWeights(.specd.internal.v1.FetchWeightsRequest) -> stream .specd.internal.v1.WeightChunk",
            "specd.internal.v1.Trainer/Status(.specd.internal.v1.TrainerStatusRequest) -> .specd.internal.v1.TrainerStatus",
            "specd.internal.v1.Trainer/SubmitSamples(stream .specd.internal.v1.DistillSample) -> .specd.internal.v1.SubmitAck",
            "specd.v1.Generation/Generate(.specd.v1.GenerateRequest) -> .specd.v1.GenerateResponse",
            "specd.v1.Generation/GenerateStream(.specd.v1.GenerateRequest) -> stream .specd.v1.GenerateStreamResponse",
            "specd.v1.Generation/ListModels(.specd.v1.ListModelsRequest) -> .specd.v1.ListModelsResponse",
            "specd.v1.Generation/Tokenize(.specd.v1.TokenizeRequest) -> .specd.v1.TokenizeResponse",
        ];
        assert_eq!(methods, expected);
    }

    /// The generated gRPC names must match the descriptor, or reflection would advertise services
    /// that the server does not route.
    #[test]
    fn generated_service_names_match_descriptor() {
        use tonic::server::NamedService;
        let names = service_names(&descriptor_set());
        for generated in [
            <super::v1::generation_server::GenerationServer<Unimplemented> as NamedService>::NAME,
            <super::internal::v1::drafter_server::DrafterServer<Unimplemented> as NamedService>::NAME,
            <super::internal::v1::target_server::TargetServer<Unimplemented> as NamedService>::NAME,
            <super::internal::v1::trainer_server::TrainerServer<Unimplemented> as NamedService>::NAME,
        ] {
            assert!(names.iter().any(|n| n == generated), "{generated} not in {names:?}");
        }
    }

    /// Stand-in service type: `NamedService` is implemented for any `T`, so no trait impl is needed.
    struct Unimplemented;
}
