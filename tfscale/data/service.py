"""A tf.data service (TF's `tf.data.experimental.service`) on one machine, for tests and single-host runs.

Ying et al., "Image Classification at Supercomputer Scale", arXiv:1811.06992, move input preprocessing off the
training hosts when they cannot keep up; TF's tf.data service does this: a dispatcher hands out splits of the
source (the files) to workers that run the preprocessing graph, and trainers fetch finished batches over gRPC.
`imagenet_dataset(..., data_service_address="grpc://host:port")` is the client side; `LocalDataService` starts a
dispatcher and N workers in this process (on 127.0.0.1) and `start_worker` adds a worker on another host.
"""

import tensorflow as tf


class LocalDataService:
    """A tf.data service dispatcher plus `num_workers` workers in this process, on 127.0.0.1.

    Args:
      num_workers: int > 0, number of workers. Default 2.
      port: int, dispatcher port; 0 (default) picks a free one.
      protocol: str, "grpc" (default).

    Attributes:
      address: str, "grpc://127.0.0.1:<port>", to pass as `data_service_address`.
      target: str, "127.0.0.1:<port>".

    Raises:
      ValueError: if `num_workers` is not an int > 0.

    Example:
      >>> with LocalDataService(num_workers=2) as service:
      ...     ds = imagenet_dataset(pattern, False, 224, 64, data_service_address=service.address)
    """

    def __init__(self, num_workers=2, port=0, protocol="grpc"):
        if not isinstance(num_workers, int) or num_workers <= 0:
            raise ValueError(f"Argument `num_workers` must be an int > 0. Received: num_workers={num_workers!r}")
        self.dispatcher = tf.data.experimental.service.DispatchServer(
            tf.data.experimental.service.DispatcherConfig(port=port, protocol=protocol)
        )
        self.target = self.dispatcher.target.split("://", 1)[-1]
        self.address = f"{protocol}://{self.target}"
        self.workers = [start_worker(self.target, protocol) for _ in range(num_workers)]

    def stop(self):
        """Stops the workers, then the dispatcher."""
        for w in self.workers:
            w._stop()  # noqa: SLF001 - the public API has no stop(); the servers shut down on deletion.
        self.workers = []
        self.dispatcher._stop()  # noqa: SLF001

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_worker(dispatcher_target, protocol="grpc", port=0):
    """Starts one tf.data service worker in this process.

    Args:
      dispatcher_target: str, "host:port" of the dispatcher (without the protocol).
      protocol: str, "grpc" (default).
      port: int, worker port; 0 (default) picks a free one.

    Returns:
      The `tf.data.experimental.service.WorkerServer` (keep a reference: it stops when garbage-collected).
    """
    return tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=dispatcher_target, worker_address=f"127.0.0.1:%port%", port=port, protocol=protocol
        )
    )
