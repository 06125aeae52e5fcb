"""OpenTelemetry semantic-convention attribute names, in one place.

Stable ``db.*``, ``http.*``, ``server.*``, ``client.*``, ``network.*``, ``url.*``;
current (development) ``messaging.*``. Names sniff adds itself start with
``sniff.``.
"""

# messaging
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_DESTINATION_SUBSCRIPTION_NAME = "messaging.destination.subscription.name"
MESSAGING_RABBITMQ_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGING_RABBITMQ_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONVERSATION_ID = "messaging.message.conversation_id"
MESSAGING_BODY_SIZE = "messaging.message.body.size"
MESSAGING_CLIENT_ID = "messaging.client.id"
MESSAGING_BATCH_COUNT = "messaging.batch.message_count"

# database
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
DB_OPERATION_NAME = "db.operation.name"
DB_COLLECTION_NAME = "db.collection.name"
DB_QUERY_TEXT = "db.query.text"
DB_QUERY_SUMMARY = "db.query.summary"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
DB_RESPONSE_RETURNED_ROWS = "db.response.returned_rows"
DB_OPERATION_BATCH_SIZE = "db.operation.batch.size"

# http
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
HTTP_REQUEST_BODY_SIZE = "http.request.body.size"
HTTP_RESPONSE_BODY_SIZE = "http.response.body.size"
URL_PATH = "url.path"
URL_QUERY = "url.query"
URL_SCHEME = "url.scheme"
USER_AGENT_ORIGINAL = "user_agent.original"

# connection
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
CLIENT_ADDRESS = "client.address"
CLIENT_PORT = "client.port"
NETWORK_PEER_ADDRESS = "network.peer.address"
NETWORK_PEER_PORT = "network.peer.port"
NETWORK_PROTOCOL_NAME = "network.protocol.name"
NETWORK_PROTOCOL_VERSION = "network.protocol.version"
NETWORK_TRANSPORT = "network.transport"
PEER_SERVICE = "peer.service"
ERROR_TYPE = "error.type"

# sniff's own
SNIFF_CONN = "sniff.conn_id"
SNIFF_INJECTED = "sniff.traceparent.injected"
SNIFF_INJECT_NOTE = "sniff.traceparent.note"
SNIFF_CORRELATION_METHOD = "sniff.correlation.method"
SNIFF_CORRELATION_CONFIDENCE = "sniff.correlation.confidence"
SNIFF_INCOMPLETE = "sniff.incomplete"

# http (added for the HTTP proxy)
HTTP_REQUEST_METHOD_ORIGINAL = "http.request.method_original"
HTTP_REQUEST_HEADER_PREFIX = "http.request.header."
HTTP_RESPONSE_HEADER_PREFIX = "http.response.header."
HTTP_REQUEST_RESEND_COUNT = "http.request.resend_count"
SNIFF_CLIENT_SERVICE = "sniff.client.service"
SNIFF_HTTP_ROUTE_SOURCE = "sniff.http.route_source"
SNIFF_HTTP_ENGINE = "sniff.http.engine"
SNIFF_HTTP_UPGRADE = "sniff.http.upgrade"
SNIFF_HTTP_TUNNEL_C2S = "sniff.http.tunnel.bytes_from_client"
SNIFF_HTTP_TUNNEL_S2C = "sniff.http.tunnel.bytes_from_server"
SNIFF_HTTP_INTERIM = "sniff.http.interim_status_codes"
SNIFF_HTTP_INCOMPLETE_REQUEST = "sniff.http.request.incomplete"

# database (added for the SQL proxies)
DB_QUERY_PARAMETER_PREFIX = "db.query.parameter."
SNIFF_DB_USER = "sniff.db.user"
SNIFF_DB_TABLES = "sniff.db.tables"
SNIFF_DB_ROWS_AFFECTED = "sniff.db.rows_affected"
SNIFF_DB_BATCH_INDEX = "sniff.db.batch.index"
SNIFF_DB_STATEMENT_ID = "sniff.db.statement_id"
SNIFF_DB_WARNINGS = "sniff.db.warnings"
SNIFF_DB_QUERY_TRUNCATED = "sniff.db.query.truncated"
SNIFF_DB_COMMAND = "sniff.db.command"
SNIFF_DB_INFILE_BYTES = "sniff.db.infile_bytes"
