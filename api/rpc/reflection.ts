/**
 * gRPC server reflection (grpc.reflection.v1 and the older v1alpha), answered from the descriptors
 * that protoc-gen-es embeds in generated code, so `buf curl`, grpcurl and Postman can discover and call
 * our services without a local copy of the .proto files.
 *
 * Connect-ES ships no reflection service; this one is small because @bufbuild/protobuf already holds
 * every file descriptor (DescFile.proto) with its imports (DescFile.dependencies).
 */
import type { DescFile, DescMessage, DescService, MessageInitShape } from "@bufbuild/protobuf";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ConnectRouter } from "@connectrpc/connect";
import {
  ServerReflection,
  type ServerReflectionRequest,
  ServerReflectionRequestSchema,
  type ServerReflectionResponse,
  ServerReflectionResponseSchema,
} from "../../proto/gen/grpc/reflection/v1/reflection_pb.ts";
import {
  ServerReflection as ServerReflectionV1Alpha,
  type ServerReflectionRequest as V1AlphaRequest,
  ServerReflectionRequestSchema as V1AlphaRequestSchema,
  type ServerReflectionResponse as V1AlphaResponse,
  ServerReflectionResponseSchema as V1AlphaResponseSchema,
} from "../../proto/gen/grpc/reflection/v1alpha/reflection_pb.ts";

/** Answers reflection requests for a fixed set of services (and everything their files import). */
export interface ReflectionIndex {
  /** Fully qualified names of the served services, sorted. */
  readonly serviceNames: readonly string[];
  /** Answers one grpc.reflection.v1 request. Never throws: failures become error_response. */
  answer(req: ServerReflectionRequest): ServerReflectionResponse;
}

/** Every file in `roots` and their transitive imports, keyed by file name ("a/b.proto"). */
function collectFiles(roots: Iterable<DescFile>): Map<string, DescFile> {
  const files = new Map<string, DescFile>();
  const visit = (f: DescFile): void => {
    if (files.has(f.proto.name)) return;
    files.set(f.proto.name, f);
    for (const d of f.dependencies) visit(d);
  };
  for (const f of roots) visit(f);
  return files;
}

/**
 * Maps every symbol a client may ask for to its file: messages, enums, services, methods, fields and
 * extensions, nested ones included. Enum values are not indexed (protobuf scopes them to the parent).
 */
function indexSymbols(files: Iterable<DescFile>): Map<string, DescFile> {
  const symbols = new Map<string, DescFile>();
  const addMessage = (m: DescMessage): void => {
    symbols.set(m.typeName, m.file);
    for (const f of m.fields) symbols.set(`${m.typeName}.${f.name}`, m.file);
    for (const o of m.oneofs) symbols.set(`${m.typeName}.${o.name}`, m.file);
    for (const n of m.nestedMessages) addMessage(n);
    for (const e of m.nestedEnums) symbols.set(e.typeName, e.file);
    for (const x of m.nestedExtensions) symbols.set(x.typeName, x.file);
  };
  for (const file of files) {
    for (const m of file.messages) addMessage(m);
    for (const e of file.enums) symbols.set(e.typeName, file);
    for (const x of file.extensions) symbols.set(x.typeName, file);
    for (const s of file.services) {
      symbols.set(s.typeName, file);
      for (const m of s.methods) symbols.set(`${s.typeName}.${m.name}`, file);
    }
  }
  return symbols;
}

/** The file and its transitive imports, the requested file first, each serialized once. */
function fileWithDeps(file: DescFile): Uint8Array[] {
  return [...collectFiles([file]).values()].map((f) => toBinary(FileDescriptorProtoSchema, f.proto));
}

/**
 * Builds the reflection index for `services`. Pass every service the server routes (reflection and
 * health included, as other gRPC servers list them too).
 */
export function createReflectionIndex(services: readonly DescService[]): ReflectionIndex {
  const files = collectFiles(services.map((s) => s.file));
  const symbols = indexSymbols(files.values());
  const serviceNames = [...new Set(services.map((s) => s.typeName))].sort();
  // Serialized descriptors are immutable: compute each answer once.
  const cache = new Map<DescFile, Uint8Array[]>();
  const descriptors = (f: DescFile): Uint8Array[] => {
    const hit = cache.get(f);
    if (hit) return hit;
    const d = fileWithDeps(f);
    cache.set(f, d);
    return d;
  };

  const respond = (
    req: ServerReflectionRequest,
    messageResponse: NonNullable<MessageInitShape<typeof ServerReflectionResponseSchema>["messageResponse"]>,
  ): ServerReflectionResponse =>
    create(ServerReflectionResponseSchema, { validHost: req.host, originalRequest: req, messageResponse });
  const notFound = (req: ServerReflectionRequest, what: string): ServerReflectionResponse =>
    respond(req, {
      case: "errorResponse",
      value: { errorCode: Code.NotFound, errorMessage: `${what} not found` },
    });
  const fileResponse = (req: ServerReflectionRequest, file: DescFile): ServerReflectionResponse =>
    respond(req, { case: "fileDescriptorResponse", value: { fileDescriptorProto: descriptors(file) } });

  const answer = (req: ServerReflectionRequest): ServerReflectionResponse => {
    const r = req.messageRequest;
    switch (r.case) {
      case "listServices":
        return respond(req, {
          case: "listServicesResponse",
          value: { service: serviceNames.map((name) => ({ name })) },
        });
      case "fileByFilename": {
        const f = files.get(r.value);
        return f ? fileResponse(req, f) : notFound(req, `file "${r.value}"`);
      }
      case "fileContainingSymbol": {
        // Clients sometimes send a leading dot (".pkg.Type"), as in descriptor type references.
        const f = symbols.get(r.value.replace(/^\./, ""));
        return f ? fileResponse(req, f) : notFound(req, `symbol "${r.value}"`);
      }
      case "fileContainingExtension": {
        const { containingType, extensionNumber } = r.value;
        for (const f of files.values()) {
          for (const x of allExtensions(f)) {
            if (x.extendee.typeName === containingType && x.number === extensionNumber) {
              return fileResponse(req, x.file);
            }
          }
        }
        return notFound(req, `extension ${extensionNumber} of "${containingType}"`);
      }
      case "allExtensionNumbersOfType": {
        if (!symbols.has(r.value)) return notFound(req, `type "${r.value}"`);
        const numbers: number[] = [];
        for (const f of files.values()) {
          for (const x of allExtensions(f)) if (x.extendee.typeName === r.value) numbers.push(x.number);
        }
        return respond(req, {
          case: "allExtensionNumbersResponse",
          value: { baseTypeName: r.value, extensionNumber: numbers },
        });
      }
      default:
        return respond(req, {
          case: "errorResponse",
          value: { errorCode: Code.InvalidArgument, errorMessage: "no message_request set" },
        });
    }
  };

  return { serviceNames, answer };
}

/** Top-level and nested extensions declared in a file. */
function* allExtensions(file: DescFile) {
  yield* file.extensions;
  const walk = function* (m: DescMessage): Generator<DescFile["extensions"][number]> {
    yield* m.nestedExtensions;
    for (const n of m.nestedMessages) yield* walk(n);
  };
  for (const m of file.messages) yield* walk(m);
}

/** The reflection services this module serves; include them in the list passed to createReflectionIndex. */
export const reflectionServices: readonly DescService[] = [ServerReflection, ServerReflectionV1Alpha];

/**
 * Registers grpc.reflection.v1.ServerReflection and grpc.reflection.v1alpha.ServerReflection.
 * `buf curl` asks v1 first and falls back to v1alpha; grpcurl and older tools only speak v1alpha.
 */
export function registerReflection(router: ConnectRouter, index: ReflectionIndex): void {
  router.service(ServerReflection, {
    async *serverReflectionInfo(requests: AsyncIterable<ServerReflectionRequest>) {
      for await (const req of requests) yield index.answer(req);
    },
  });
  // v1alpha is wire-identical to v1 (same fields and numbers), so convert through the binary form
  // instead of keeping a second implementation.
  router.service(ServerReflectionV1Alpha, {
    async *serverReflectionInfo(requests: AsyncIterable<V1AlphaRequest>) {
      for await (const req of requests) {
        const v1 = fromBinary(ServerReflectionRequestSchema, toBinary(V1AlphaRequestSchema, req));
        const res: V1AlphaResponse = fromBinary(
          V1AlphaResponseSchema,
          toBinary(ServerReflectionResponseSchema, index.answer(v1)),
        );
        yield res;
      }
    },
  });
}
