"""nora's federated run as Flower apps: the ClientApp trains a client's adapter through nora's training engine, and
the ServerApp runs NoraStrategy, a Flower Strategy that aggregates by nora's rules (coordinator.py does the work on
both sides; Flower carries the messages). Flower's simulation runtime runs them on one machine (`nora federate`);
its deployment runtime across machines, with the apps named in a Flower app's pyproject.toml:

    [tool.flwr.app.components]
    serverapp = "nora.federated.flower:server_app"
    clientapp = "nora.federated.flower:client_app"
    [tool.flwr.app.config]
    nora-config = "/path/to/federation.json"   # FederatedConfig.to_dict() as JSON

and each SuperNode started with --node-config "partition-id=I" (its client number, 0..clients-1).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .config import FederatedConfig
from .coordinator import ClientData, Coordinator, Reply, client_data, load_tokenizer, train_client
from .participant import FederatedError, Participant
from .ranks import at_rank

PARTITION = "partition-id"


def _config(fc: FederatedConfig | None, context: Context) -> FederatedConfig:
    if fc is not None:
        return fc
    path = context.run_config.get("nora-config")
    if not path:
        raise FederatedError("the Flower app's run config has no 'nora-config' (a federation.json path).")
    return FederatedConfig.from_dict(json.loads(Path(str(path)).read_text()))


def make_client_app(fc: FederatedConfig | None = None) -> ClientApp:
    """The ClientApp: in each process, the client's model and data are built once and kept for later rounds."""
    app = ClientApp()
    cache: dict[str, tuple[Participant, ClientData]] = {}

    def party(context: Context) -> tuple[Participant, ClientData]:
        if "party" not in cache:
            cache["party"] = build_party(_config(fc, context), int(context.node_config[PARTITION]))
        return cache["party"]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"node": ConfigRecord({PARTITION: int(context.node_config[PARTITION])})}),
                       reply_to=msg)  # fmt: skip

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        participant, data = party(context)
        instructions = json.loads(str(msg.content["nora"]["instructions"]))
        client = int(context.node_config[PARTITION])
        reply = train_client(participant, data, client, instructions, msg.content["arrays"].to_torch_state_dict())
        update = ConfigRecord({"meta": json.dumps(reply.meta), "config": json.dumps(reply.config)})
        metrics = MetricRecord({"num-examples": reply.num_examples, "train-loss": reply.train_loss, "client": client})
        content = RecordDict({"arrays": ArrayRecord(reply.tensors), "metrics": metrics, "update": update})
        return Message(content, reply_to=msg)

    return app


class NoraStrategy(Strategy):
    """Rounds of a nora federated run (numbered on from `coordinator.start_round`): each samples the clients the
    coordinator chooses, sends them the global adapter's travelling tensors, and aggregates the replies by nora's
    rule; the global adapter is evaluated and saved by the coordinator after every round."""

    def __init__(self, coordinator: Coordinator, nodes: dict[int, int]) -> None:
        self.coordinator, self.nodes = coordinator, nodes  # nodes: client number → Flower node id
        self.offset = coordinator.start_round - 1

    def summary(self) -> None:
        fc = self.coordinator.fc
        print(f"NoraStrategy: {fc.train.method} by rule {self.coordinator.rule.name!r}, {fc.per_round} of "
              f"{fc.clients} clients per round, {fc.local_steps} local steps", file=sys.stderr)  # fmt: skip

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        rnd = server_round + self.offset
        messages = []
        for client in self.coordinator.sample(rnd):
            instructions = json.dumps(self.coordinator.instructions(rnd, client))
            mine = arrays if self.coordinator.fc.rank_of(client) is None else ArrayRecord(
                self.coordinator.sent_to(client))  # fmt: skip
            content = RecordDict({"arrays": mine, "nora": ConfigRecord({"instructions": instructions})})
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                     MetricRecord | None]:  # fmt: skip
        rnd = server_round + self.offset
        by_node = {node: client for client, node in self.nodes.items()}
        answers, failures = [], {}
        for msg in replies:
            client = by_node.get(msg.metadata.src_node_id)
            name = f"node {msg.metadata.src_node_id}" if client is None else self.coordinator.data.names[client]
            if msg.has_error():
                failures[name] = msg.error.reason[-2000:]
                print(f"round {rnd}: {name} failed and is left out: {failures[name]}", file=sys.stderr)
                continue
            answers.append(_reply(msg))
        line = self.coordinator.absorb(rnd, answers, failures)
        metrics = MetricRecord({k: v for k, v in line.items() if isinstance(v, int | float) and not
                                isinstance(v, bool)})  # fmt: skip
        return ArrayRecord(self.coordinator.sent()), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:  # fmt: skip
        return []  # the server evaluates the global adapter itself, after each round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _reply(msg: Message) -> Reply:
    metrics, update = msg.content["metrics"], msg.content["update"]
    return Reply(
        int(metrics["client"]), msg.content["arrays"].to_torch_state_dict(), json.loads(str(update["meta"])),
        json.loads(str(update["config"])), int(metrics["num-examples"]), float(metrics["train-loss"]),
    )  # fmt: skip


def discover(grid: Grid, clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Client number (each node's partition-id) → Flower node id, for every one of `clients` clients."""
    node_ids = list(grid.get_node_ids())
    probes = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    found: dict[int, int] = {}
    for msg in grid.send_and_receive(probes, timeout=timeout):
        if msg.has_error():
            raise FederatedError(f"node {msg.metadata.src_node_id} did not say its partition-id: {msg.error.reason}")
        found[int(msg.content["node"][PARTITION])] = msg.metadata.src_node_id
    missing = sorted(set(range(clients)) - set(found))
    if missing:
        raise FederatedError(
            f"{len(found)} Flower nodes answered, but clients {missing[:10]} have no node: start one SuperNode per "
            f"client with --node-config 'partition-id=I' for I in 0..{clients - 1}."
        )
    return found


def make_server_app(fc: FederatedConfig | None = None, work: Path | None = None, out: dict[str, Any] | None = None,
                    ) -> ServerApp:  # fmt: skip
    """The ServerApp: the server's model and data, the clients found, then NoraStrategy's rounds. `work` is the run
    directory (claimed by the caller); `out` receives the coordinator's history when the run ends."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = _config(fc, context)
        try:
            coordinator = build_coordinator(config, work or Path(config.output_dir))
            nodes = discover(grid, config.clients)
            coordinator.evaluate_initial()
            remaining = config.rounds - coordinator.start_round + 1
            if remaining > 0:
                strategy = NoraStrategy(coordinator, nodes)
                strategy.start(grid, ArrayRecord(coordinator.sent()), num_rounds=remaining)
            if out is not None:
                out["history"] = coordinator.history
        except BaseException as e:
            if out is not None:
                out["error"], out["traceback"] = e, traceback.format_exc()
            raise

    return app


def build_party(config: FederatedConfig, client: int | None = None) -> tuple[Participant, ClientData]:
    """One party's model (the server's, or client `client`'s at its rank) and every client's data, as each process
    builds them."""
    rule = config.check()
    tokenizer = load_tokenizer(config)
    data = client_data(config, tokenizer)
    r = None if client is None else config.rank_of(client)
    train = config.train if r is None else at_rank(config.train, r)
    return Participant(train, data.labels, rule, tokenizer=tokenizer), data


def build_coordinator(config: FederatedConfig, work: Path) -> Coordinator:
    party, data = build_party(config)
    return Coordinator(config, party.rule, party, data, work)


client_app = make_client_app()
server_app = make_server_app()
