#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume
# (/docker-entrypoint-initdb.d). One database per service, each owned by its own login role,
# so the brand node's credentials cannot read the partner's tables or the coordinator's.
# In a real deployment every party runs its own database on its own premises; one shared
# server is a convenience of this compose file.
set -eu

confide_create_db() {
    # $1: role and database name, $2: the role's password
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v name="$1" -v pw="$2" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'pw';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
}

confide_create_db coordinator "$COORDINATOR_DB_PASSWORD"
confide_create_db brand "$BRAND_DB_PASSWORD"
confide_create_db partner "$PARTNER_DB_PASSWORD"
