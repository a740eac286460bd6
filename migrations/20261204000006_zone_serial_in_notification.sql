-- A zone's notification names the serial the change left it at (`zone:<id>:<serial>`). A reader that reads the zone
-- row later may see a serial a later change has already bumped; the serial in the notification is the one that
-- labels what the reader has applied so far (zone transfers publish one content per serial).
CREATE OR REPLACE FUNCTION tether_zone_row_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tether_changes', 'zone:' || OLD.id);
    ELSE
        PERFORM pg_notify('tether_changes', 'zone:' || NEW.id || ':' || NEW.serial);
    END IF;
    RETURN NULL;
END $$;
